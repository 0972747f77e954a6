//! Launch math and the thin unsafe layer: one function per kernel that computes grid, block
//! and shared memory (asserting its assumptions and falling back to a simpler variant rather
//! than failing), and passes the arguments in the order and types of the `.cu` signature.
//!
//! Everything here takes raw device addresses; the safe layer ([`super::device`]) checks
//! lengths, dtypes and alignment before calling in. Every function is `unsafe` with the same
//! contract: each pointer addresses device memory of the backend `b`, valid (and, for
//! outputs, writable) for the extents written beside it, in the stated dtype.

use super::spec::{self, Op, Tuning, Variant};
use crate::backend::{Backend, DevPtr, GemmDesc, KernelArg, LaunchDims};
use crate::dtype::DType;
use anyhow::{ensure, Context, Result};

const NULL: DevPtr = DevPtr(0);

/// `<prefix>_<suffix>` for the (activation, adapter) dtype pair, refusing pairs no kernel is
/// stamped for.
fn name(prefix: &str, act: DType, adapter: DType) -> Result<String> {
    spec::stamped(prefix, act, adapter).with_context(|| {
        format!("{prefix}: no kernel for {act} activations with {adapter} adapters")
    })
}

fn ptr(p: DevPtr) -> KernelArg {
    KernelArg::Ptr(p)
}

fn opt(p: Option<DevPtr>) -> KernelArg {
    KernelArg::Ptr(p.unwrap_or(NULL))
}

/// A size as the kernels' `int`, refusing anything that does not fit.
fn int(what: &str, v: usize) -> Result<KernelArg> {
    let i = i32::try_from(v).with_context(|| format!("{what} = {v} does not fit a kernel int"))?;
    Ok(KernelArg::I32(i))
}

/// `⌈n / per⌉` blocks, at least 1, within `limit` (the grid dimension's maximum).
fn blocks(what: &str, n: usize, per: usize, limit: u32) -> Result<u32> {
    let b = n.div_ceil(per).max(1);
    ensure!(
        b <= limit as usize,
        "{what}: {n} needs {b} blocks of {per}, over the grid limit {limit}"
    );
    Ok(b as u32)
}

const GRID_X: u32 = i32::MAX as u32;
const GRID_YZ: u32 = 65_535;
/// Most blocks of a grid-stride 1-D helper (sum_partials, scale_rows): enough to fill any
/// current GPU several times over; each thread then strides over the rest.
const HELPER_MAX_BLOCKS: u32 = 4096;

fn dims(grid: [u32; 3], threads: usize, shared_bytes: usize) -> LaunchDims {
    LaunchDims {
        grid,
        block: [threads as u32, 1, 1],
        shared_bytes: shared_bytes as u32,
    }
}

/// How a `[d_out, d_in]` weight is laid out: row-major, or transposed (`fan_in_fan_out`,
/// stored `[d_in, d_out]`). Returns the element strides `(ld_j, ld_k)` of `W0[j, k]`.
pub(crate) fn weight_strides(fan_in_fan_out: bool, d_in: usize, d_out: usize) -> (i64, i64) {
    if fan_in_fan_out {
        (1, d_out as i64)
    } else {
        (d_in as i64, 1)
    }
}

/// Arguments of the norm kernels.
pub(crate) struct NormArgs {
    /// Storage dtype of W0, A and B.
    pub dtype: DType,
    /// Storage dtype of the adapter tensors read (A, B): `dtype` or f32.
    pub adapter: DType,
    /// W0 `[d_out, d_in]` (or `[d_in, d_out]` with `fan_in_fan_out`).
    pub w0: DevPtr,
    /// W0 is stored `[d_in, d_out]`.
    pub fan_in_fan_out: bool,
    /// A `[r, d_in]`.
    pub a: DevPtr,
    /// B `[d_out, r]`.
    pub b: DevPtr,
    /// m `[d_out]` f32, or `None` (then g is not written).
    pub m: Option<DevPtr>,
    /// s.
    pub s: f32,
    /// Output features.
    pub d_out: usize,
    /// Input features.
    pub d_in: usize,
    /// Rank.
    pub r: usize,
    /// n `[d_out]` f32, written.
    pub n_out: DevPtr,
    /// g `[d_out]` f32, written when `m` is given.
    pub g_out: Option<DevPtr>,
    /// Scratch for the partial sums of a norm split over d_in, at least
    /// [`spec::norm_partials_len`] f32; `None` runs unsplit (one block per row tile).
    pub part: Option<DevPtr>,
}

/// 1 when the tuned configuration may read the row-major matrices at `mats` (address, row
/// stride in elements, dtype) in 16-byte loads, else 0 (scalar loads).
fn vec16_flag(mats: &[(DevPtr, usize, DType)]) -> i32 {
    let ok = spec::tuning() == Tuning::Tuned
        && mats.iter().all(|&(p, ld, dt)| spec::vec16_ok(p.0, ld, dt));
    ok as i32
}

/// The norm variant to use: `forced` if given (tests), else the table's choice.
fn norm_variant(
    dtype: DType,
    adapter: DType,
    r: usize,
    forced: Option<&'static Variant>,
) -> Result<&'static Variant> {
    if let Some(v) = forced {
        ensure!(
            v.op == Op::Norm && v.supports(dtype, adapter, r),
            "{} cannot run {dtype} with {adapter} adapters at rank {r}",
            v.prefix
        );
        return Ok(v);
    }
    let v = spec::select(Op::Norm, dtype, adapter, r).with_context(|| {
        format!("no norm kernel for {dtype} with {adapter} adapters at rank {r}")
    })?;
    // Before tuning, f32 adapters beside 16-bit W0 ran on CUDA cores (v1 `_a32`): keep that
    // under `Tuning::Previous`, so a GPU run times the two against each other.
    if v.version == 2 && adapter != dtype && spec::tuning() == Tuning::Previous {
        return spec::candidates(Op::Norm, dtype, adapter, r)
            .into_iter()
            .find(|v| v.version == 1)
            .context("norm v1 missing from the table");
    }
    // Fall back to v1 where v2's shared memory would not fit (`select` already skips such a
    // v2: f32 adapters at r > 112; this keeps a future table edit honest).
    if v.version == 2 && spec::norm_shared_bytes(2, adapter, r) > spec::MAX_DYNAMIC_SHARED {
        return spec::candidates(Op::Norm, dtype, adapter, r)
            .into_iter()
            .find(|v| v.version == 1)
            .context("norm v1 missing from the table");
    }
    Ok(v)
}

/// Launches the norm (`n`, and `g = m / max(n, ε)` when `m` is given).
///
/// # Safety
/// See the module doc; extents are those of [`NormArgs`].
pub(crate) unsafe fn norm<B: Backend>(
    b: &B,
    x: &NormArgs,
    forced: Option<&'static Variant>,
) -> Result<()> {
    ensure!(
        (1..=spec::MAX_RANK).contains(&x.r),
        "norm: rank {} outside 1..={}",
        x.r,
        spec::MAX_RANK
    );
    let v = norm_variant(x.dtype, x.adapter, x.r, forced)?;
    let (ldj, ldk) = weight_strides(x.fan_in_fan_out, x.d_in, x.d_out);
    let tuning = if x.part.is_some() {
        spec::tuning()
    } else {
        Tuning::Previous
    };
    let (splits, per) = spec::norm_splits(v.version, x.adapter, x.d_out, x.d_in, x.r, tuning);
    debug_assert!(splits * x.d_out <= spec::norm_partials_len(x.d_out, x.d_in));
    // 16-byte loads in v2 only: in the v1 pass (f32 tiles in shared memory) the unpacking
    // made ptxas spill on sm_80/86.
    let vec = if x.fan_in_fan_out || v.version != 2 {
        0
    } else {
        vec16_flag(&[(x.w0, x.d_in, x.dtype), (x.a, x.d_in, x.adapter)])
    };
    let part = if splits > 1 { x.part } else { None };
    let (grid, threads, shared) = if v.version == 2 {
        let sh = spec::norm_shared_bytes(2, x.adapter, x.r);
        ensure!(
            sh <= spec::MAX_DYNAMIC_SHARED,
            "norm v2: {sh} bytes of shared memory"
        );
        (
            [
                blocks("norm v2 rows", x.d_out, spec::NT_ROWS, GRID_X)?,
                splits as u32,
                1,
            ],
            spec::WARP_SIZE * spec::NT_WARPS,
            sh,
        )
    } else {
        (
            [
                blocks("norm v1 rows", x.d_out, spec::VT_ROWS, GRID_X)?,
                splits as u32,
                1,
            ],
            spec::THREADS,
            spec::vtile_shared_bytes(x.r),
        )
    };
    let mut args = vec![
        ptr(x.w0),
        KernelArg::I64(ldj),
        KernelArg::I64(ldk),
        ptr(x.a),
        ptr(x.b),
        opt(x.m),
        KernelArg::F32(x.s),
        KernelArg::F32(crate::layer::NORM_EPS as f32),
        int("d_out", x.d_out)?,
        int("d_in", x.d_in)?,
        int("r", x.r)?,
        int("columns per split", per)?,
    ];
    if v.version == 2 {
        args.push(KernelArg::I32(vec));
    }
    args.extend([opt(part), ptr(x.n_out), opt(x.g_out)]);
    let name = v.entry(x.dtype, x.adapter);
    // SAFETY: the argument list matches `dora_norm_v1_<dt>(w0, ldw_j, ldw_k, a, b, m, s, eps,
    // d_out, d_in, r, k_per_split, part, n_out, g_out)` (v2: `vec` after k_per_split) in
    // kernels/norm.cu in order and type; the caller guarantees the extents (and `part`
    // holds norm_partials_len ≥ splits·d_out f32); `vec` is 1 only when W0 and A are
    // row-major with 16-byte aligned bases and rows; the grid covers every row (⌈d_out/rows per block⌉ blocks) and every
    // split (splits = ⌈d_in/per⌉, per a multiple of the 64-column chunk); each block writes
    // n (and g) of all of its rows, or, split, their partial sums into row `split` of part.
    unsafe { b.launch(&name, dims(grid, threads, shared), &args) }
        .with_context(|| format!("launching {name}"))?;
    let Some(part) = part else {
        return Ok(());
    };
    let d = dims(
        [
            blocks("norm_reduce", x.d_out, spec::SMALL_THREADS, GRID_X)?,
            1,
            1,
        ],
        spec::SMALL_THREADS,
        0,
    );
    let args = [
        ptr(part),
        int("splits", splits)?,
        opt(x.m),
        KernelArg::F32(crate::layer::NORM_EPS as f32),
        int("d_out", x.d_out)?,
        ptr(x.n_out),
        opt(x.g_out),
    ];
    // SAFETY: matches `dora_norm_reduce_f32(part, splits, m, eps, d_out, n_out, g_out)` in
    // kernels/norm.cu; part [splits, d_out] was written whole by the launch above (ordered
    // before on the stream); one thread per row covers all d_out.
    unsafe { b.launch("dora_norm_reduce_f32", d, &args) }.context("launching dora_norm_reduce_f32")
}

/// Arguments of the merged_weight kernel: `out = diag(g)·(W0 + s·B·A)` as `[d_out, d_in]`.
pub(crate) struct MergedWeightArgs {
    /// Storage dtype of W0, A, B.
    pub dtype: DType,
    /// Storage dtype of the adapter tensors read (A, B): `dtype` or f32.
    pub adapter: DType,
    /// W0 as in [`NormArgs`].
    pub w0: DevPtr,
    /// W0 is stored `[d_in, d_out]`.
    pub fan_in_fan_out: bool,
    /// A `[r, d_in]`.
    pub a: DevPtr,
    /// B `[d_out, r]`.
    pub b: DevPtr,
    /// g `[d_out]` f32, or `None` for g = 1 (V itself, or plain LoRA).
    pub g: Option<DevPtr>,
    /// s.
    pub s: f32,
    /// Output features.
    pub d_out: usize,
    /// Input features.
    pub d_in: usize,
    /// Rank.
    pub r: usize,
    /// Output `[d_out, d_in]`, in f32 when `f32_out`, else in `dtype`.
    pub out: DevPtr,
    /// Write f32 instead of the storage dtype.
    pub f32_out: bool,
}

/// Launches merged_weight (W' = g ⊙ V, in the weight dtype or f32).
///
/// # Safety
/// See the module doc; extents are those of [`MergedWeightArgs`].
pub(crate) unsafe fn merged_weight<B: Backend>(b: &B, x: &MergedWeightArgs) -> Result<()> {
    ensure!(
        (1..=spec::MAX_RANK).contains(&x.r),
        "merged_weight: rank {} outside 1..={}",
        x.r,
        spec::MAX_RANK
    );
    let (ldj, ldk) = weight_strides(x.fan_in_fan_out, x.d_in, x.d_out);
    let prefix = if x.f32_out {
        "dora_merged_weight_f32out"
    } else {
        "dora_merged_weight"
    };
    let name = name(prefix, x.dtype, x.adapter)?;
    let d = dims(
        [
            blocks("merged_weight rows", x.d_out, spec::VT_ROWS, GRID_X)?,
            1,
            1,
        ],
        spec::THREADS,
        spec::vtile_shared_bytes(x.r),
    );
    let args = [
        ptr(x.w0),
        KernelArg::I64(ldj),
        KernelArg::I64(ldk),
        ptr(x.a),
        ptr(x.b),
        opt(x.g),
        KernelArg::F32(x.s),
        int("d_out", x.d_out)?,
        int("d_in", x.d_in)?,
        int("r", x.r)?,
        ptr(x.out),
    ];
    // SAFETY: matches `dora_merged_weight[_f32out]_<dt>(w0, ldw_j, ldw_k, a, b, g, s, d_out,
    // d_in, r, out)` in kernels/norm.cu; the grid covers all d_out rows and each block writes
    // every column of its rows.
    unsafe { b.launch(&name, d, &args) }.with_context(|| format!("launching {name}"))
}

/// Arguments of shrink: `out[z, t, i] (+)= coef[t]·Σ_{k in split z} X[t, k]·A[i, k]`.
pub(crate) struct ShrinkArgs {
    /// Storage dtype of X.
    pub dtype: DType,
    /// Storage dtype of A: `dtype` or f32.
    pub adapter: DType,
    /// X `[rows, d_in]` row-major (row stride `ldx`).
    pub x: DevPtr,
    /// Row stride of X in elements (≥ d_in).
    pub ldx: usize,
    /// A `[r, d_in]`.
    pub a: DevPtr,
    /// Rows of X (tokens, or d_out when X = V).
    pub rows: usize,
    /// Reduction length.
    pub d_in: usize,
    /// Rank.
    pub r: usize,
    /// Allow splitting d_in across blocks ([`shrink_splits`]); the output then holds one
    /// `[rows, r]` slab per split, summed by compose.
    pub split_k: bool,
    /// `None`: out = acc. `Some(coef [rows] f32)`: out += coef[t]·acc (never split).
    pub coef: Option<DevPtr>,
    /// Output `[splits, rows, r]` f32.
    pub out: DevPtr,
}

/// `(rank tile, rows per block)` of shrink at rank `r`: tuned, the least power of two ≥ r
/// within [`spec::SH_MIN_RANKS`]`..=`[`spec::SH_RANKS`]; previous, always `SH_RANKS`; with the
/// rows that keep `SH_ROWS·SH_RANKS` outputs per block (kernels/forward.cu).
pub(crate) fn shrink_tile(r: usize) -> (usize, usize) {
    let rt = match spec::tuning() {
        Tuning::Previous => spec::SH_RANKS,
        Tuning::Tuned => r
            .next_power_of_two()
            .clamp(spec::SH_MIN_RANKS, spec::SH_RANKS),
    };
    (rt, spec::SH_ROWS * spec::SH_RANKS / rt)
}

/// `(splits, columns per split)` of shrink: one split unless allowed; otherwise enough to
/// fill [`spec::TARGET_BLOCKS`] when the rows alone do not (decode), each split at least
/// 128 columns and a whole number of 32-column chunks.
pub(crate) fn shrink_splits(rows: usize, r: usize, d_in: usize, allow: bool) -> (usize, usize) {
    let chunks = d_in.div_ceil(spec::SH_KCHUNK).max(1);
    if !allow {
        return (1, chunks * spec::SH_KCHUNK);
    }
    let (rt, brows) = shrink_tile(r);
    let base = rows.div_ceil(brows) * r.div_ceil(rt);
    let max = d_in.div_ceil(128).clamp(1, GRID_YZ as usize);
    let want = spec::TARGET_BLOCKS.div_ceil(base).clamp(1, max);
    let per = chunks.div_ceil(want) * spec::SH_KCHUNK;
    (d_in.div_ceil(per).max(1), per)
}

/// Launches shrink; returns the number of splits (slabs written).
///
/// # Safety
/// See the module doc; extents are those of [`ShrinkArgs`], with `out` holding
/// [`shrink_splits`]`(rows, r, d_in, split_k).0` slabs.
pub(crate) unsafe fn shrink<B: Backend>(b: &B, x: &ShrinkArgs) -> Result<usize> {
    ensure!(
        x.ldx >= x.d_in,
        "shrink: row stride {} < d_in {}",
        x.ldx,
        x.d_in
    );
    ensure!(
        !(x.split_k && x.coef.is_some()),
        "shrink: an accumulating shrink cannot be split"
    );
    let (splits, per) = shrink_splits(x.rows, x.r, x.d_in, x.split_k);
    let (rt, brows) = shrink_tile(x.r);
    let name = name("dora_shrink", x.dtype, x.adapter)?;
    let d = dims(
        [
            blocks("shrink rows", x.rows, brows, GRID_X)?,
            blocks("shrink ranks", x.r, rt, GRID_YZ)?,
            splits as u32,
        ],
        spec::THREADS,
        0,
    );
    let args = [
        ptr(x.x),
        KernelArg::I64(x.ldx as i64),
        KernelArg::I64(1),
        ptr(x.a),
        int("rows", x.rows)?,
        int("d_in", x.d_in)?,
        int("r", x.r)?,
        int("columns per split", per)?,
        opt(x.coef),
        ptr(x.out),
        int("rank tile", rt)?,
    ];
    // SAFETY: matches `dora_shrink_<dt>(x, ldx_t, ldx_k, a, rows, d_in, r, k_per_split, coef,
    // out, rt)` in kernels/forward.cu; rt is 16, 32 or 64 (shrink_tile), which the kernel's
    // shared tiles are sized for; the grid covers ⌈rows/brows⌉ × ⌈r/rt⌉ tiles of every
    // split, each writing all of its in-range outputs into its split's slab (every split is
    // non-empty: splits = ⌈d_in/per⌉).
    unsafe { b.launch(&name, d, &args) }.with_context(|| format!("launching {name}"))?;
    Ok(splits)
}

/// Arguments of compose: `y = g ⊙ (base + s·U·Bmᵀ) + bias`.
pub(crate) struct ComposeArgs {
    /// Storage dtype of base and y.
    pub dtype: DType,
    /// Storage dtype of Bm (B, or A for grad_x): `dtype` or f32.
    pub adapter: DType,
    /// base `[t, d_out]`, rows `ld_base` apart (may equal `y`).
    pub base: DevPtr,
    /// Row stride of base (≥ d_out).
    pub ld_base: usize,
    /// y `[t, d_out]`, rows `ld_y` apart.
    pub y: DevPtr,
    /// Row stride of y (≥ d_out).
    pub ld_y: usize,
    /// U as `u_splits` slabs `[t, r]` f32, summed in order.
    pub u: DevPtr,
    /// Slabs of U (shrink's splits).
    pub u_splits: usize,
    /// Bm: element (j, i) at `bm[j*ld_j + i*ld_i]`.
    pub bm: DevPtr,
    /// Strides of Bm: `(r, 1)` for B `[d_out, r]`, `(1, d_out)` for Aᵀ with A `[r, d_out]`.
    pub bm_strides: (i64, i64),
    /// g `[d_out]` f32, or `None` for g = 1.
    pub g: Option<DevPtr>,
    /// bias `[d_out]` f32, or `None`.
    pub bias: Option<DevPtr>,
    /// s.
    pub s: f32,
    /// Rows (tokens).
    pub t: usize,
    /// Columns.
    pub d_out: usize,
    /// Rank.
    pub r: usize,
}

/// Launches compose.
///
/// # Safety
/// See the module doc; extents are those of [`ComposeArgs`].
pub(crate) unsafe fn compose<B: Backend>(b: &B, x: &ComposeArgs) -> Result<()> {
    ensure!(
        x.ld_base >= x.d_out && x.ld_y >= x.d_out && x.u_splits >= 1,
        "compose: row strides {}/{} below d_out {} or no U",
        x.ld_base,
        x.ld_y,
        x.d_out
    );
    let name = name("dora_compose", x.dtype, x.adapter)?;
    let d = dims(
        [
            blocks("compose tokens", x.t, spec::CO_ROWS, GRID_X)?,
            blocks("compose columns", x.d_out, spec::CO_COLS, GRID_YZ)?,
            1,
        ],
        spec::THREADS,
        0,
    );
    let args = [
        ptr(x.base),
        KernelArg::I64(x.ld_base as i64),
        ptr(x.y),
        KernelArg::I64(x.ld_y as i64),
        ptr(x.u),
        int("U splits", x.u_splits)?,
        ptr(x.bm),
        KernelArg::I64(x.bm_strides.0),
        KernelArg::I64(x.bm_strides.1),
        opt(x.g),
        opt(x.bias),
        KernelArg::F32(x.s),
        int("T", x.t)?,
        int("d_out", x.d_out)?,
        int("r", x.r)?,
    ];
    // SAFETY: matches `dora_compose_<dt>(base, ld_base, y, ld_y, u, u_splits, bm, ldb_j,
    // ldb_i, g, bias, s, t_rows, d_out, r)` in kernels/forward.cu; base and y may alias
    // (each element is read and then written by one thread); the grid covers every
    // (token, column).
    unsafe { b.launch(&name, d, &args) }.with_context(|| format!("launching {name}"))
}

/// Arguments of the one-pass backward over dy.
pub(crate) struct BwdDzArgs {
    /// Storage dtype of dy, base, B, dz.
    pub dtype: DType,
    /// Storage dtype of the adapter tensors read (A, B): `dtype` or f32.
    pub adapter: DType,
    /// dy `[t, d_out]`.
    pub dy: DevPtr,
    /// base `[t, d_out]` (DoRA).
    pub base: Option<DevPtr>,
    /// U `[t, r]` f32 (DoRA).
    pub u: DevPtr,
    /// B `[d_out, r]`.
    pub b: DevPtr,
    /// g `[d_out]` f32; `None` for plain LoRA (dz = dy, nothing else written but dzb).
    pub g: Option<DevPtr>,
    /// s.
    pub s: f32,
    /// Tokens.
    pub t: usize,
    /// Output features.
    pub d_out: usize,
    /// Rank.
    pub r: usize,
    /// dz `[t, d_out]` (DoRA).
    pub dz: Option<DevPtr>,
    /// c partials `[bwd_dz_parts(t, r), d_out]` f32 (DoRA).
    pub cpart: Option<DevPtr>,
    /// dz·B `[t, r]` f32.
    pub dzb: DevPtr,
    /// Scratch for the per-split slabs of dz·B when d_out is split, at least
    /// [`bwd_dz_partials_len`] f32; `None` runs unsplit.
    pub dzb_part: Option<DevPtr>,
}

/// f32 elements of the dz·B slabs a split bwd_dz writes under the current
/// [`spec::tuning`] (0 when it does not split).
pub(crate) fn bwd_dz_partials_len(t: usize, d_out: usize, r: usize) -> usize {
    match spec::bwd_dz_splits(t, d_out, r, spec::tuning()).0 {
        1 => 0,
        s => s * t * r,
    }
}

/// Rows of the c-partials `bwd_dz` writes for `t` tokens at rank `r`.
pub(crate) fn bwd_dz_parts(t: usize, r: usize) -> usize {
    t.div_ceil(spec::bwd_dz_tiles(r).0).max(1)
}

/// Launches the one-pass backward.
///
/// # Safety
/// See the module doc; extents are those of [`BwdDzArgs`].
pub(crate) unsafe fn bwd_dz<B: Backend>(b: &B, x: &BwdDzArgs) -> Result<()> {
    ensure!(
        (1..=spec::MAX_RANK).contains(&x.r),
        "bwd_dz: rank {} outside 1..={}",
        x.r,
        spec::MAX_RANK
    );
    let dora = x.g.is_some();
    ensure!(
        !dora || (x.base.is_some() && x.dz.is_some() && x.cpart.is_some()),
        "bwd_dz: DoRA needs base, dz and c partials"
    );
    let (tt, jt) = spec::bwd_dz_tiles(x.r);
    let sh = spec::bwd_dz_shared_bytes(tt, jt, x.r);
    ensure!(
        sh <= spec::MAX_DYNAMIC_SHARED,
        "bwd_dz: {sh} bytes of shared memory at rank {}",
        x.r
    );
    let name = name("dora_bwd_dz", x.dtype, x.adapter)?;
    let (splits, per) = match x.dzb_part {
        Some(_) => spec::bwd_dz_splits(x.t, x.d_out, x.r, spec::tuning()),
        None => spec::bwd_dz_splits(x.t, x.d_out, x.r, Tuning::Previous),
    };
    let slabs = if splits > 1 {
        x.dzb_part.context("bwd_dz: a split needs dz·B slabs")?
    } else {
        x.dzb
    };
    let d = dims(
        [blocks("bwd_dz tokens", x.t, tt, GRID_X)?, splits as u32, 1],
        spec::THREADS,
        sh,
    );
    let args = [
        ptr(x.dy),
        opt(x.base),
        ptr(x.u),
        ptr(x.b),
        opt(x.g),
        KernelArg::F32(x.s),
        int("T", x.t)?,
        int("d_out", x.d_out)?,
        int("r", x.r)?,
        int("tt", tt)?,
        int("jt", jt)?,
        int("columns per split", per)?,
        opt(x.dz),
        opt(x.cpart),
        ptr(slabs),
    ];
    // SAFETY: matches `dora_bwd_dz_<dt>(dy, base, u, b, g, s, t_rows, d_out, r, tt, jt,
    // cols_per_split, dz, cpart, dzb)` in kernels/backward.cu; blocks (token tile, split)
    // cover every (token, column) once (splits = ⌈d_out/per⌉, per a multiple of jt), so every
    // element of dz and of cpart's ⌈t/tt⌉ rows is written, and each split writes its whole
    // [t, r] slab of `slabs` (dzb itself when unsplit; else dzb_part, which holds
    // bwd_dz_partials_len = splits·t·r f32).
    unsafe { b.launch(&name, d, &args) }.with_context(|| format!("launching {name}"))?;
    if splits > 1 {
        sum_partials(b, slabs, splits, x.t, x.r, 1.0, None, false, false, x.dzb)?;
    }
    Ok(())
}

/// `out [rows, r] = Σ_split part[split]` over the `splits` slabs of a split-K shrink, in
/// split order (`dora_sum_partials_f32`): the one slab of U a training forward keeps.
///
/// # Safety
/// `part` holds `splits·rows·r` f32 and `out` `rows·r` f32.
pub(crate) unsafe fn sum_slabs<B: Backend>(
    b: &B,
    part: DevPtr,
    splits: usize,
    rows: usize,
    r: usize,
    out: DevPtr,
) -> Result<()> {
    sum_partials(b, part, splits, rows, r, 1.0, None, false, false, out)
}

/// Launches `dora_sum_partials_f32`: `out (+)= alpha·colscale ⊙ Σ_split part[split]` over
/// `[r, ncols]` slabs, in split order.
///
/// # Safety
/// `part` holds `splits·r·ncols` f32, `col_scale` `ncols` f32, `out` `r·ncols` f32.
#[allow(clippy::too_many_arguments)]
unsafe fn sum_partials<B: Backend>(
    b: &B,
    part: DevPtr,
    splits: usize,
    r: usize,
    ncols: usize,
    alpha: f32,
    col_scale: Option<DevPtr>,
    transpose: bool,
    accumulate: bool,
    out: DevPtr,
) -> Result<()> {
    let n = r * ncols;
    let d = dims(
        [
            blocks("sum_partials", n, spec::SMALL_THREADS, GRID_X)?.min(HELPER_MAX_BLOCKS),
            1,
            1,
        ],
        spec::SMALL_THREADS,
        0,
    );
    let args = [
        ptr(part),
        int("splits", splits)?,
        int("r", r)?,
        int("ncols", ncols)?,
        KernelArg::F32(alpha),
        opt(col_scale),
        KernelArg::I32(transpose as i32),
        KernelArg::I32(accumulate as i32),
        ptr(out),
    ];
    // SAFETY: matches `dora_sum_partials_f32(part, splits, r, ncols, alpha, colscale,
    // transpose, accumulate, out)`; grid-stride over all r·ncols outputs; extents from the
    // caller's contract.
    unsafe { b.launch("dora_sum_partials_f32", d, &args) }
        .context("launching dora_sum_partials_f32")
}

/// Arguments of mag_reduce.
pub(crate) struct MagReduceArgs {
    /// c partials `[parts, d_out]` f32.
    pub cpart: DevPtr,
    /// Rows of `cpart`.
    pub parts: usize,
    /// n `[d_out]` f32.
    pub n: DevPtr,
    /// m `[d_out]` f32.
    pub m: DevPtr,
    /// s (the exact-gradient coefficient is −s·m⊙c/n³).
    pub s: f32,
    /// Output features.
    pub d_out: usize,
    /// grad_m `[d_out]` f32, written.
    pub dm: DevPtr,
    /// −s·k `[d_out]` f32, written when given (exact gradient).
    pub kcoef: Option<DevPtr>,
}

/// Launches mag_reduce.
///
/// # Safety
/// See the module doc; extents are those of [`MagReduceArgs`].
pub(crate) unsafe fn mag_reduce<B: Backend>(b: &B, x: &MagReduceArgs) -> Result<()> {
    let d = dims(
        [
            blocks("mag_reduce", x.d_out, spec::SMALL_THREADS, GRID_X)?,
            1,
            1,
        ],
        spec::SMALL_THREADS,
        0,
    );
    let args = [
        ptr(x.cpart),
        int("parts", x.parts)?,
        ptr(x.n),
        ptr(x.m),
        KernelArg::F32(crate::layer::NORM_EPS as f32),
        KernelArg::F32(-x.s),
        int("d_out", x.d_out)?,
        ptr(x.dm),
        opt(x.kcoef),
    ];
    // SAFETY: matches `dora_mag_reduce_f32(cpart, parts, n, m, eps, neg_s, d_out, dm, kcoef)`
    // in kernels/backward.cu; one thread per column covers all d_out.
    unsafe { b.launch("dora_mag_reduce_f32", d, &args) }.context("launching dora_mag_reduce_f32")
}

/// A long-reduction product `out (+)= alpha·Lᵀ·R`, through per-split partials.
pub(crate) struct TnArgs {
    /// Storage dtype of R.
    pub dtype: DType,
    /// L `[rows, r]` f32.
    pub l: DevPtr,
    /// R `[rows, ncols]` in `dtype`.
    pub rm: DevPtr,
    /// The reduction length.
    pub rows: usize,
    /// Rank (columns of L).
    pub r: usize,
    /// Columns of R.
    pub ncols: usize,
    /// Partials scratch, at least [`tn_partials_len`] f32.
    pub part: DevPtr,
    /// Scale of the sum.
    pub alpha: f32,
    /// Per-column scale `[ncols]` f32 of the sum (the g of grad_B), or `None`.
    pub col_scale: Option<DevPtr>,
    /// Write `[ncols, r]` instead of `[r, ncols]`.
    pub transpose: bool,
    /// Add to `out` instead of overwriting it.
    pub accumulate: bool,
    /// Output f32, `[r, ncols]` or `[ncols, r]`.
    pub out: DevPtr,
}

/// `(splits, rows per split)` of a long reduction under the current [`spec::tuning`]
/// ([`spec::tn_splits`]).
fn tn_splits(rows: usize, r: usize, ncols: usize) -> (usize, usize) {
    spec::tn_splits(rows, r, ncols, spec::tuning())
}

/// f32 elements of partials scratch a [`TnArgs`] product needs (under the current
/// [`spec::tuning`]).
pub(crate) fn tn_partials_len(rows: usize, r: usize, ncols: usize) -> usize {
    tn_splits(rows, r, ncols).0 * r * ncols
}

/// Launches tn (the rank-tile variant from [`spec::VARIANTS`]) and the fixed-order sum.
///
/// # Safety
/// See the module doc; extents are those of [`TnArgs`].
pub(crate) unsafe fn tn<B: Backend>(
    b: &B,
    x: &TnArgs,
    forced: Option<&'static Variant>,
) -> Result<()> {
    ensure!(
        (1..=spec::MAX_RANK).contains(&x.r),
        "tn: rank {} outside 1..={}",
        x.r,
        spec::MAX_RANK
    );
    let v = match forced {
        Some(v) => {
            ensure!(
                v.op == Op::Tn && v.supports(x.dtype, x.dtype, x.r),
                "{} cannot run rank {}",
                v.prefix,
                x.r
            );
            v
        }
        None => spec::select(Op::Tn, x.dtype, x.dtype, x.r).context("no tn kernel")?,
    };
    let (splits, per) = tn_splits(x.rows, x.r, x.ncols);
    let name = v.entry(x.dtype, x.dtype);
    let d = dims(
        [
            blocks("tn columns", x.ncols, spec::TN_COLS, GRID_X)?,
            blocks("tn ranks", x.r, v.rank_tile, GRID_YZ)?,
            splits as u32,
        ],
        spec::THREADS,
        0,
    );
    let args = [
        ptr(x.l),
        ptr(x.rm),
        int("rows", x.rows)?,
        int("r", x.r)?,
        int("ncols", x.ncols)?,
        int("rows per split", per)?,
        ptr(x.part),
    ];
    // SAFETY: matches `dora_tn_r{16,64}_<dt>(l, rm, rows, r, ncols, rows_per_split, part)` in
    // kernels/backward.cu; the grid covers every (column, rank) of every split, and every
    // split (including an empty tail) writes its whole [r, ncols] slab of `part`, which holds
    // splits·r·ncols floats.
    unsafe { b.launch(&name, d, &args) }.with_context(|| format!("launching {name}"))?;
    // SAFETY: part holds splits·r·ncols f32 written above; col_scale [ncols] and out (r·ncols
    // f32) by the caller's contract.
    unsafe {
        sum_partials(
            b,
            x.part,
            splits,
            x.r,
            x.ncols,
            x.alpha,
            x.col_scale,
            x.transpose,
            x.accumulate,
            x.out,
        )
    }
}

/// Launches scale_rows: `out[j, i] = coef[j]·in[j, i]` in f32.
///
/// # Safety
/// `input` `[rows, cols]` in `dtype`, `coef` `[rows]` f32, `out` `[rows, cols]` f32.
pub(crate) unsafe fn scale_rows<B: Backend>(
    b: &B,
    dtype: DType,
    input: DevPtr,
    coef: DevPtr,
    (rows, cols): (usize, usize),
    out: DevPtr,
) -> Result<()> {
    let name = name("dora_scale_rows", dtype, dtype)?;
    let d = dims(
        [
            blocks("scale_rows", rows * cols, spec::SMALL_THREADS, GRID_X)?.min(HELPER_MAX_BLOCKS),
            1,
            1,
        ],
        spec::SMALL_THREADS,
        0,
    );
    let args = [
        ptr(input),
        ptr(coef),
        int("rows", rows)?,
        int("cols", cols)?,
        ptr(out),
    ];
    // SAFETY: matches `dora_scale_rows_<dt>(in, coef, rows, cols, out)`; grid-stride over all
    // rows·cols elements.
    unsafe { b.launch(&name, d, &args) }.with_context(|| format!("launching {name}"))
}

/// `C[m×n] = alpha·X[m×k]·op(W)[k×n] + beta·C` with X, W, C all in `dtype` (row-major,
/// dense), through the backend's GEMM.
pub(crate) struct Gemm {
    /// Dtype of all three matrices.
    pub dtype: DType,
    /// Rows of C.
    pub m: usize,
    /// Columns of C.
    pub n: usize,
    /// Reduction.
    pub k: usize,
    /// X `[m, k]`.
    pub x: DevPtr,
    /// W stored `[n, k]` when `trans_w`, else `[k, n]`.
    pub w: DevPtr,
    /// Use Wᵀ.
    pub trans_w: bool,
    /// C `[m, n]`, rows `ldc` apart.
    pub c: DevPtr,
    /// Row stride of C (≥ n).
    pub ldc: usize,
    /// Scale of the product.
    pub alpha: f32,
    /// Scale of the existing C.
    pub beta: f32,
}

/// Runs a [`Gemm`].
///
/// # Safety
/// See the module doc; extents are those of [`Gemm`].
pub(crate) unsafe fn gemm<B: Backend>(b: &B, g: &Gemm) -> Result<()> {
    let desc = GemmDesc {
        m: g.m,
        n: g.n,
        k: g.k,
        a: g.x,
        a_dtype: g.dtype,
        lda: g.k,
        trans_a: false,
        b: g.w,
        b_dtype: g.dtype,
        ldb: if g.trans_w { g.k } else { g.n },
        trans_b: g.trans_w,
        c: g.c,
        c_dtype: g.dtype,
        ldc: g.ldc,
        alpha: g.alpha,
        beta: g.beta,
    };
    // SAFETY: the caller guarantees X, W and C hold the dense matrices described, which is
    // exactly what `desc` (strides = row lengths) tells the backend.
    unsafe { b.gemm(&desc) }.with_context(|| {
        format!(
            "gemm {}x{}x{} ({}, trans_w={})",
            g.m, g.n, g.k, g.dtype, g.trans_w
        )
    })
}
