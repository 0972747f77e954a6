//! Row-block passes over a whole weight, at memory speed: merging an adapter into W0,
//! undoing that merge, and the DoRA paper's Figure-2 statistics.
//!
//! Each pass splits the `d_out` rows of W into one contiguous range per core; each thread
//! walks its range in blocks of rows small enough to stay in the core's cache
//! ([`BLOCK_ELEMS`]; the Figure-2 pass, which writes nothing back, takes blocks of
//! [`super::W0_BLOCK_ELEMS`]), widens the block once from the stored dtype (`half`'s slice
//! conversions), applies the rank-`r` update `± s·B_blk·A` with [`gemm`] on column panels
//! of [`PANEL_COLS`] (small enough that `matrixmultiply` runs each on the calling thread, so
//! the two threads never queue on its pool), finishes each row (norm, scale) and rounds the
//! block straight into the output bytes. W is read once, where it lies (a [`RowLayer`]
//! borrows it, from a memory-mapped file for `merge` and `inspect`), the output written
//! once, and nothing of size `d_out × d_in` is allocated besides the output.
//!
//! The merged values are bit-identical to [`super::merged_weight`] followed by rounding to
//! the stored dtype: every element sees the same products in the same order (blocks and
//! panels start on multiples of the GEMM kernels' tile sizes, so no tile is split
//! differently), the same row sum of squares and the same rounding.
//!
//! These passes take row-major `[d_out, d_in]` weights (`fan_in_fan_out == false`); the
//! callers use [`super::merged_weight`] and the f64 loops for `[d_in, d_out]` weights.

use super::gemm::{gemm, gemm_on_this_thread, View, ViewMut};
use super::{sumsq, threads, widen, EPS, PAR_MIN_ELEMS, W0_BLOCK_ELEMS};
use crate::dtype::DType;
use crate::layer::{Layer, NORM_EPS};
use crate::tensor::{Tensor, TensorData};
use anyhow::{bail, ensure, Result};
use half::slice::HalfFloatSliceExt;
use half::{bf16, f16};
use std::borrow::Cow;
use std::ops::Range;

/// Elements of one thread's block of rows (f32: 512 KiB), so that the block, A's column
/// panel and the GEMM's packing buffers stay in a core's L2 cache.
const BLOCK_ELEMS: usize = 1 << 17;

/// Columns per GEMM call. `matrixmultiply` splits a product over its own thread pool when
/// `m·k + k·n ≥ 2¹⁴`; with `k = r ≤ 16` and at most 256 block rows, 512 columns stay below
/// that for `r ≤ 10`, and for larger `r` the split costs only a queue on its pool. A
/// multiple of every x86 kernel's tile width (8 and 16), so tiles are never split.
const PANEL_COLS: usize = 512;

/// Rows per block: a multiple of 16 (every `matrixmultiply` kernel's row tile divides it),
/// at least 16, at most 256.
fn block_rows(d_in: usize) -> usize {
    ((BLOCK_ELEMS / d_in.max(1)) / 16 * 16).clamp(16, 256)
}

/// A weight's elements in their stored dtype, borrowed: from a [`Tensor`], or from the
/// little-endian bytes of a file (copied once only when those bytes are not aligned to the
/// dtype, which safetensors files written by PyTorch never are).
#[derive(Debug, Clone)]
pub enum Elems<'a> {
    /// f32 elements.
    F32(Cow<'a, [f32]>),
    /// f16 elements.
    F16(Cow<'a, [f16]>),
    /// bf16 elements.
    BF16(Cow<'a, [bf16]>),
}

impl<'a> Elems<'a> {
    /// The elements of a tensor, borrowed.
    pub fn of(data: &'a TensorData) -> Self {
        match data {
            TensorData::F32(v) => Elems::F32(Cow::Borrowed(v)),
            TensorData::F16(v) => Elems::F16(Cow::Borrowed(v)),
            TensorData::BF16(v) => Elems::BF16(Cow::Borrowed(v)),
        }
    }

    /// The elements stored as little-endian `dtype` in `bytes`, borrowed when aligned.
    ///
    /// # Errors
    /// `bytes` is not a whole number of elements.
    pub fn from_bytes(dtype: DType, bytes: &'a [u8]) -> Result<Self> {
        ensure!(
            bytes.len() % dtype.size() == 0,
            "{} bytes are not a whole number of {dtype} elements",
            bytes.len()
        );
        fn cast<'b, T: bytemuck::Pod>(b: &'b [u8]) -> Cow<'b, [T]> {
            match bytemuck::try_cast_slice(b) {
                Ok(v) => Cow::Borrowed(v),
                Err(_) => Cow::Owned(bytemuck::pod_collect_to_vec(b)),
            }
        }
        #[cfg(not(target_endian = "little"))]
        compile_error!("the row passes read little-endian files in place");
        Ok(match dtype {
            DType::F32 => Elems::F32(cast(bytes)),
            DType::F16 => Elems::F16(cast(bytes)),
            DType::BF16 => Elems::BF16(cast(bytes)),
        })
    }

    /// The storage dtype.
    pub fn dtype(&self) -> DType {
        match self {
            Elems::F32(_) => DType::F32,
            Elems::F16(_) => DType::F16,
            Elems::BF16(_) => DType::BF16,
        }
    }

    /// Number of elements.
    pub fn len(&self) -> usize {
        match self {
            Elems::F32(v) => v.len(),
            Elems::F16(v) => v.len(),
            Elems::BF16(v) => v.len(),
        }
    }

    /// True when there are no elements.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// `dst ← self[start..start + dst.len()]`, widened exactly.
    fn load(&self, start: usize, dst: &mut [f32]) {
        let r = start..start + dst.len();
        match self {
            Elems::F32(v) => dst.copy_from_slice(&v[r]),
            Elems::F16(v) => v[r].convert_to_f32_slice(dst),
            Elems::BF16(v) => widen_bf16(&v[r], dst),
        }
    }
}

/// `dst ← src` widened: bf16 is the top half of an f32, so a shift, vectorised (`half`
/// converts element by element; NaN payloads are kept, and rounding back sets the quiet
/// bit). With AVX2 when the CPU has it (8 lanes instead of SSE2's 4; the same bits).
fn widen_bf16(src: &[bf16], dst: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: the running CPU supports AVX2 (detected just above), which is all that
        // calling a function compiled with `target_feature(enable = "avx2")` requires.
        return unsafe { widen_bf16_avx2(src, dst) };
    }
    widen_bf16_lanes(src, dst)
}

/// [`widen_bf16_lanes`] compiled for AVX2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn widen_bf16_avx2(src: &[bf16], dst: &mut [f32]) {
    widen_bf16_lanes(src, dst)
}

/// The loop of [`widen_bf16`].
#[inline(always)]
fn widen_bf16_lanes(src: &[bf16], dst: &mut [f32]) {
    dst.iter_mut()
        .zip(src)
        .for_each(|(d, s)| *d = f32::from_bits((s.to_bits() as u32) << 16));
}

/// The bits of `v` rounded to bf16, round-to-nearest-even, NaN kept as a quiet NaN: the
/// same bits as `half::bf16::from_f32` (tested), branch-free so that a slice of them
/// vectorises.
#[inline(always)]
fn bf16_bits(v: f32) -> u16 {
    let x = v.to_bits();
    // Round up when the dropped half is above 0x8000, or exactly 0x8000 with an odd result.
    let up = ((x & 0x8000) != 0 && (x & 0x1_7fff) != 0) as u32;
    let rounded = ((x >> 16) + up) as u16;
    let nan = ((x >> 16) | 0x40) as u16;
    if x & 0x7fff_ffff > 0x7f80_0000 {
        nan
    } else {
        rounded
    }
}

/// A row-major `[d_out, d_in]` layer as the row passes read it: W0 borrowed in its stored
/// dtype (never widened as a whole), the adapter factors as f32 (`lora_A [r, d_in]`,
/// `lora_B [d_out, r]`, the magnitude `[d_out]`), and the scaling s.
#[derive(Debug, Clone)]
pub struct RowLayer<'a> {
    w: Elems<'a>,
    d_out: usize,
    d_in: usize,
    r: usize,
    a: Cow<'a, [f32]>,
    b: Cow<'a, [f32]>,
    m: Option<Cow<'a, [f32]>>,
    s: f32,
}

impl<'a> RowLayer<'a> {
    /// The layer's tensors, borrowed (f32 adapter tensors) or widened (others).
    ///
    /// # Errors
    /// An invalid layer, or one stored `[d_in, d_out]` (`fan_in_fan_out`).
    pub fn new(layer: &'a Layer) -> Result<Self> {
        let (_, d_out, _) = layer.dims()?;
        ensure!(
            !layer.fan_in_fan_out,
            "weight stored [d_in, d_out] (fan_in_fan_out): the row-block passes take [d_out, d_in]"
        );
        Self::from_parts(
            Elems::of(layer.weight.data()),
            d_out,
            &layer.lora_a,
            &layer.lora_b,
            layer.magnitude.as_ref(),
            layer.scaling,
        )
    }

    /// A layer from a borrowed weight (`d_out` rows; `d_in` is its length over `d_out`) and
    /// the adapter's tensors (any dtype; widened to f32 unless f32 already).
    ///
    /// # Errors
    /// Shapes that disagree, naming the tensor and its shape.
    pub fn from_parts(
        weight: Elems<'a>,
        d_out: usize,
        lora_a: &'a Tensor,
        lora_b: &'a Tensor,
        magnitude: Option<&'a Tensor>,
        scaling: f64,
    ) -> Result<Self> {
        ensure!(
            d_out > 0 && weight.len() % d_out == 0,
            "weight has {} elements, not a whole number of {d_out} rows",
            weight.len()
        );
        let d_in = weight.len() / d_out;
        let r = match lora_a.shape() {
            [r, k] if *k == d_in => *r,
            s => bail!("lora_A has shape {s:?}, expected [r, {d_in}]"),
        };
        ensure!(
            lora_b.shape() == [d_out, r],
            "lora_B has shape {:?}, expected [{d_out}, {r}]",
            lora_b.shape()
        );
        if let Some(m) = magnitude {
            ensure!(
                m.len() == d_out,
                "magnitude has shape {:?}, expected [{d_out}]",
                m.shape()
            );
        }
        Ok(Self {
            w: weight,
            d_out,
            d_in,
            r,
            a: widen(lora_a),
            b: widen(lora_b),
            m: magnitude.map(widen),
            s: scaling as f32,
        })
    }

    /// `(d_in, d_out, r)`.
    pub fn dims(&self) -> (usize, usize, usize) {
        (self.d_in, self.d_out, self.r)
    }

    /// The weight's storage dtype.
    pub fn dtype(&self) -> DType {
        self.w.dtype()
    }
}

/// Rounds `src` to `dtype` (round-to-nearest-even, as [`crate::tensor::Tensor::from_f32`])
/// and writes the little-endian bytes to `dst` (`src.len() · dtype.size()` bytes).
fn store(dtype: DType, src: &[f32], dst: &mut [u8]) {
    debug_assert_eq!(dst.len(), src.len() * dtype.size());
    match dtype {
        DType::F32 => dst.copy_from_slice(bytemuck::cast_slice(src)),
        DType::F16 => match bytemuck::try_cast_slice_mut::<u8, f16>(dst) {
            Ok(d) => d.convert_from_f32_slice(src),
            Err(_) => dst
                .chunks_exact_mut(2)
                .zip(src)
                .for_each(|(d, &s)| d.copy_from_slice(&f16::from_f32(s).to_le_bytes())),
        },
        DType::BF16 => match bytemuck::try_cast_slice_mut::<u8, u16>(dst) {
            Ok(d) => d
                .iter_mut()
                .zip(src)
                .for_each(|(d, &s)| *d = bf16_bits(s).to_le()),
            Err(_) => dst
                .chunks_exact_mut(2)
                .zip(src)
                .for_each(|(d, &s)| d.copy_from_slice(&bf16_bits(s).to_le_bytes())),
        },
    }
}

/// One contiguous range of rows per thread (one range for small weights).
fn row_ranges(d_out: usize, d_in: usize) -> Vec<Range<usize>> {
    let nt = if d_out * d_in < PAR_MIN_ELEMS {
        1
    } else {
        threads().min(d_out.div_ceil(16)).max(1)
    };
    // Split on multiples of 16 rows, so that every block starts on a kernel tile.
    let per = d_out.div_ceil(nt).div_ceil(16) * 16;
    (0..nt)
        .map(|i| (i * per).min(d_out)..((i + 1) * per).min(d_out))
        .filter(|r| !r.is_empty())
        .collect()
}

/// Runs `f(state, rows, block)` over every block of rows of `w` (`[d_out, d_in]`), one
/// thread per range of `ranges` with its own state; `block` holds rows `rows` widened to
/// f32, `[rows.len(), d_in]`. Returns the states in row order, or the first error in row
/// order.
fn for_row_blocks<S, F>(
    w: &Elems<'_>,
    d_in: usize,
    br: usize,
    ranges: &[Range<usize>],
    states: Vec<S>,
    f: F,
) -> Result<Vec<S>>
where
    S: Send,
    F: Fn(&mut S, Range<usize>, &mut [f32]) -> Result<()> + Sync,
{
    let work = |range: Range<usize>, mut st: S| -> Result<S> {
        let mut buf = vec![0.0f32; br.min(range.len()) * d_in];
        let mut j0 = range.start;
        while j0 < range.end {
            let j1 = (j0 + br).min(range.end);
            let blk = &mut buf[..(j1 - j0) * d_in];
            w.load(j0 * d_in, blk);
            f(&mut st, j0..j1, blk)?;
            j0 = j1;
        }
        Ok(st)
    };
    if ranges.len() <= 1 {
        return states
            .into_iter()
            .zip(ranges)
            .map(|(s, r)| work(r.clone(), s))
            .collect();
    }
    std::thread::scope(|sc| {
        let handles: Vec<_> = ranges
            .iter()
            .cloned()
            .zip(states)
            .map(|(r, s)| {
                let work = &work;
                sc.spawn(move || work(r, s))
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or_else(|p| std::panic::resume_unwind(p)))
            .collect()
    })
}

/// `v ← α·B_blk·A + β·v` for one block: `b_blk [rows, r]`, `a [r, d_in]`, `v [rows, d_in]`,
/// one [`gemm`] per column panel (β = 0 overwrites `v`).
fn rank_update(alpha: f32, b_blk: &[f32], a: &[f32], r: usize, beta: f32, v: &mut [f32]) {
    let d_in = a.len() / r.max(1);
    let rows = v.len() / d_in.max(1);
    let mut c0 = 0;
    while c0 < d_in {
        let w = PANEL_COLS.min(d_in - c0);
        gemm(
            alpha,
            View::new(b_blk, rows, r),
            View::strided(&a[c0..], r, w, d_in, 1),
            beta,
            ViewMut::strided(&mut v[c0..], rows, w, d_in),
        );
        c0 += w;
    }
}

/// Splits `out` (`d_out` rows of `row_bytes`) and `g` (`d_out` values, or empty) by
/// `ranges`.
fn split_by<'o, 'g>(
    ranges: &[Range<usize>],
    mut out: &'o mut [u8],
    row_bytes: usize,
    mut g: &'g mut [f32],
) -> Vec<(usize, &'o mut [u8], &'g mut [f32])> {
    let mut parts = Vec::with_capacity(ranges.len());
    for r in ranges {
        let (o, rest) = std::mem::take(&mut out).split_at_mut(r.len() * row_bytes);
        out = rest;
        let gl = if g.is_empty() { 0 } else { r.len() };
        let (gp, grest) = std::mem::take(&mut g).split_at_mut(gl);
        g = grest;
        parts.push((r.start, o, gp));
    }
    parts
}

/// `W' = diag(g)·(W0 + s·B·A)` (g = 1 for plain LoRA), rounded to W0's dtype and written as
/// little-endian bytes into `out`; see [`RowLayer::merged_weight_into`].
///
/// # Errors
/// An invalid or `fan_in_fan_out` layer; as [`RowLayer::merged_weight_into`].
pub fn merged_weight_into(layer: &Layer, out: &mut [u8]) -> Result<Option<Vec<f32>>> {
    RowLayer::new(layer)?.merged_weight_into(out)
}

/// Undoes a merge row block by row block; see [`RowLayer::unmerged_weight_into`] (the
/// layer's weight is the merged weight; its magnitude is ignored).
///
/// # Errors
/// An invalid or `fan_in_fan_out` layer; as [`RowLayer::unmerged_weight_into`].
pub fn unmerged_weight_into(layer: &Layer, g: Option<&[f32]>, out: &mut [u8]) -> Result<()> {
    RowLayer::new(layer)?.unmerged_weight_into(g, out)
}

/// The DoRA paper's Figure-2 quantities of a layer; see [`RowLayer::figure2`].
///
/// # Errors
/// An invalid or `fan_in_fan_out` layer.
pub fn figure2(layer: &Layer) -> Result<(f64, f64, f64)> {
    Ok(RowLayer::new(layer)?.figure2())
}

impl RowLayer<'_> {
    /// `W' = diag(g)·(W0 + s·B·A)` (g = 1 for plain LoRA), rounded to W0's dtype and written
    /// as little-endian bytes into `out` (`d_out · d_in · size` bytes, `[d_out, d_in]`
    /// row-major); returns g `[d_out]` (f32, `m / max(‖W0_j + s·B_j·A‖, ε)`, the value each
    /// row was scaled by), or `None` for plain LoRA.
    ///
    /// Bit-identical to [`super::merged_weight`] rounded to W0's dtype; both cores, one pass
    /// over W0.
    ///
    /// # Errors
    /// `out` of the wrong length; a non-finite element of W' (f32, before rounding), named by
    /// row and column.
    pub fn merged_weight_into(&self, out: &mut [u8]) -> Result<Option<Vec<f32>>> {
        let (d_in, d_out, r) = self.dims();
        let dtype = self.dtype();
        let row_bytes = d_in * dtype.size();
        ensure!(
            out.len() == d_out * row_bytes,
            "merged weight: output buffer is {} bytes, expected {d_out}×{d_in} {dtype}",
            out.len()
        );
        let (a, b, m, s) = (&self.a, &self.b, &self.m, self.s);
        let mut g = vec![0.0f32; if m.is_some() { d_out } else { 0 }];
        let ranges = row_ranges(d_out, d_in);
        let states = split_by(&ranges, out, row_bytes, &mut g);
        for_row_blocks(
            &self.w,
            d_in,
            block_rows(d_in),
            &ranges,
            states,
            |(first, out, gs): &mut (usize, &mut [u8], &mut [f32]), rows, v: &mut [f32]| {
                rank_update(s, &b[rows.start * r..rows.end * r], a, r, 1.0, v);
                if let Some(m) = m {
                    for (jj, row) in v.chunks_exact_mut(d_in).enumerate() {
                        let j = rows.start + jj;
                        let gj = m[j] / sumsq(row).sqrt().max(EPS);
                        row.iter_mut().for_each(|e| *e *= gj);
                        gs[j - *first] = gj;
                    }
                }
                // A branch-free scan (vectorised); the position only when there is one.
                if v.iter().fold(false, |any, x| any | !x.is_finite()) {
                    let i = v.iter().position(|x| !x.is_finite()).unwrap_or(0);
                    bail!(
                        "the merged weight has a non-finite element at row {}, column {}",
                        rows.start + i / d_in,
                        i % d_in
                    );
                }
                let o = (rows.start - *first) * row_bytes..(rows.end - *first) * row_bytes;
                store(dtype, v, &mut out[o]);
                Ok(())
            },
        )?;
        Ok(m.is_some().then_some(g))
    }

    /// Undoes a merge row block by row block: `W0 = W'/g − s·B·A` (`W0 = W' − s·B·A` for
    /// plain LoRA) from the merged weight this layer holds, with the g the merge used,
    /// rounded to the weight's dtype and written as little-endian bytes into `out`. A zero g
    /// loses its row: it comes back as `−s·B_j·A`.
    ///
    /// Bit-identical to [`crate::adapter::compute::unmerge_weight`] rounded to the weight's
    /// dtype.
    ///
    /// # Errors
    /// `g` or `out` of the wrong length.
    pub fn unmerged_weight_into(&self, g: Option<&[f32]>, out: &mut [u8]) -> Result<()> {
        let (d_in, d_out, r) = self.dims();
        let dtype = self.dtype();
        let row_bytes = d_in * dtype.size();
        ensure!(
            out.len() == d_out * row_bytes,
            "unmerged weight: output buffer is {} bytes, expected {d_out}×{d_in} {dtype}",
            out.len()
        );
        if let Some(g) = g {
            ensure!(
                g.len() == d_out,
                "g has {} elements, expected {d_out}",
                g.len()
            );
        }
        let (a, b, s) = (&self.a, &self.b, self.s);
        let ranges = row_ranges(d_out, d_in);
        let states = split_by(&ranges, out, row_bytes, &mut []);
        for_row_blocks(
            &self.w,
            d_in,
            block_rows(d_in),
            &ranges,
            states,
            |(first, out, _): &mut (usize, &mut [u8], &mut [f32]), rows, v: &mut [f32]| {
                if let Some(g) = g {
                    for (row, &gj) in v.chunks_exact_mut(d_in).zip(&g[rows.clone()]) {
                        let inv = if gj != 0.0 { 1.0 / gj } else { 0.0 };
                        row.iter_mut().for_each(|x| *x *= inv);
                    }
                }
                rank_update(-s, &b[rows.start * r..rows.end * r], a, r, 1.0, v);
                let o = (rows.start - *first) * row_bytes..(rows.end - *first) * row_bytes;
                store(dtype, v, &mut out[o]);
                Ok(())
            },
        )?;
        Ok(())
    }

    /// The DoRA paper's Figure-2 quantities of the layer (Liu et al. 2024, §3.2):
    /// ΔM = mean_j |m_j − ‖W0_j‖|, ΔD = mean_j (1 − cos(W0_j, W'_j)) and ‖W0‖_F, with
    /// `V = W0 + s·B·A`, `g_j = m_j / max(‖V_j‖, ε)` and `W'_j = g_j·V_j`; for plain LoRA
    /// `m_j = ‖V_j‖` and `W' = V`. A row where W0_j or W'_j is zero has no direction and
    /// counts as cos = 1. Returned as f64.
    ///
    /// One pass over W0 on both cores, neither V nor `s·B·A` formed: each row gives
    /// `a = ‖W0_j‖²` (an f64 sum of exact f32 squares), `b = W0_j·(s·B_j·A) = s·B_j·P_jᵀ`
    /// with `P = W0·Aᵀ` (`[rows, r]` per block of rows, an f32 GEMM with the long `d_in`
    /// as its inner dimension, on the thread that widened the block) and
    /// `c = ‖s·B_j·A‖² = s²·B_j·(A·Aᵀ)·B_jᵀ` (the `r × r` Gram matrix of A in f64, once).
    /// Then `‖V_j‖² = a + 2b + c` and, where cos > 0,
    /// `1 − cos = (a·c − b²) / (‖W0_j‖·‖V_j‖·(‖W0_j‖·‖V_j‖ + a + b))` (Lagrange's identity),
    /// which keeps its digits when W' is close to W0's direction, where `1 − cos` computed as
    /// such would cancel. Agrees with the f64 row loop
    /// ([`crate::adapter::stats::figure2`] on a `[d_in, d_out]` weight) to 1e-7 relative
    /// (tested).
    pub fn figure2(&self) -> (f64, f64, f64) {
        let (d_in, d_out, r) = self.dims();
        let (a, b, m, s) = (&self.a, &self.b, &self.m, self.s as f64);
        // The Gram matrix A·Aᵀ `[r, r]` in f64, on this thread (too small to wake a pool).
        let a64: Vec<f64> = a.iter().map(|&v| v as f64).collect();
        let mut gram = vec![0.0f64; r * r];
        gemm_on_this_thread(
            1.0,
            View::new(&a64, r, d_in),
            View::new(&a64, r, d_in).t(),
            0.0,
            ViewMut::new(&mut gram, r, r),
        );
        let ranges = row_ranges(d_out, d_in);
        // Larger blocks than the merge's: the `gemm` crate repacks Aᵀ once per block, and
        // nothing here is written back. Measured on the TinyLlama-shaped model (2 cores):
        // 0.61 s with the merge's blocks, 0.53 s with 4× their rows, 0.49 s with these.
        let br = (W0_BLOCK_ELEMS / d_in.max(1) / 16 * 16).clamp(16, 1024);
        // Per thread: (ΔM sum, ΔD sum, ‖W0‖² sum, P of a block `[rows, r]`).
        let states: Vec<(f64, f64, f64, Vec<f32>)> = ranges
            .iter()
            .map(|rg| (0.0, 0.0, 0.0, vec![0.0; br.min(rg.len()) * r]))
            .collect();
        let sums = for_row_blocks(
            &self.w,
            d_in,
            br,
            &ranges,
            states,
            |(dm, dd, w0sq, pbuf), rows, w0: &mut [f32]| {
                let n = rows.len();
                let p = &mut pbuf[..n * r];
                gemm_on_this_thread(
                    1.0,
                    View::new(w0, n, d_in),
                    View::new(a, r, d_in).t(),
                    0.0,
                    ViewMut::new(p, n, r),
                );
                for (jj, (w0r, pr)) in w0.chunks_exact(d_in).zip(p.chunks_exact(r)).enumerate() {
                    let j = rows.start + jj;
                    let bj = &b[j * r..(j + 1) * r];
                    let aa = sumsq_f64(w0r);
                    let bb = s * bj
                        .iter()
                        .zip(pr)
                        .map(|(&x, &y)| x as f64 * y as f64)
                        .sum::<f64>();
                    let cc = s * s * quad_form(&gram, bj);
                    let (row_dm, row_dd) = figure2_row(aa, bb, cc, m.as_ref().map(|m| m[j] as f64));
                    *w0sq += aa;
                    *dm += row_dm;
                    *dd += row_dd;
                }
                Ok(())
            },
        )
        .expect("the Figure-2 pass has no failing step");
        let (dm, dd, w0sq) = sums.iter().fold((0.0, 0.0, 0.0), |acc, s| {
            (acc.0 + s.0, acc.1 + s.1, acc.2 + s.2)
        });
        (dm / d_out as f64, dd / d_out as f64, w0sq.sqrt())
    }
}

/// `x·G·xᵀ` for a row `x [r]` (f32, widened) and a symmetric `G [r, r]` (f64).
fn quad_form(g: &[f64], x: &[f32]) -> f64 {
    let r = x.len();
    (0..r)
        .map(|k| {
            let gk = &g[k * r..(k + 1) * r];
            let row: f64 = gk.iter().zip(x).map(|(&gv, &xv)| gv * xv as f64).sum();
            x[k] as f64 * row
        })
        .sum()
}

/// One row's `(|m_j − ‖W0_j‖|, 1 − cos(W0_j, W'_j))` from `a = ‖W0_j‖²`, `b = W0_j·Δ_j`,
/// `c = ‖Δ_j‖²` and the magnitude (`None`: plain LoRA, `m_j = ‖V_j‖`, g = 1); see
/// [`RowLayer::figure2`].
fn figure2_row(a: f64, b: f64, c: f64, m: Option<f64>) -> (f64, f64) {
    let w0n = a.sqrt();
    let vn2 = (a + 2.0 * b + c).max(0.0);
    let vn = vn2.sqrt();
    let (mj, gj) = match m {
        Some(m) => (m, m / vn.max(NORM_EPS)),
        None => (vn, 1.0),
    };
    let wn = gj.abs() * vn;
    let one_minus_cos = if w0n > 0.0 && wn > 0.0 {
        // cos(W0_j, V_j) = (a + b) / (‖W0_j‖·‖V_j‖); W'_j = g_j·V_j flips it when g_j < 0.
        let nn = w0n * vn;
        if gj > 0.0 && a + b > 0.0 {
            (a * c - b * b).max(0.0) / (nn * (nn + a + b))
        } else {
            1.0 - gj.signum() * (a + b) / nn
        }
    } else {
        0.0
    };
    ((mj - w0n).abs(), one_minus_cos)
}

/// `‖w‖²` of a row in 8 f64 lanes (vectorisable; with AVX2 when the CPU has it, where
/// SSE2's 2-lane vectors made this sum a fifth of `inspect --base`'s CPU time; 16 lanes
/// spilled registers): a square of an f32 value is exact in f64, so this is W0's own row
/// norm to f64 rounding.
fn sumsq_f64(w: &[f32]) -> f64 {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: the running CPU supports AVX2 (detected just above), which is all that
        // calling a function compiled with `target_feature(enable = "avx2")` requires.
        return unsafe { sumsq_f64_avx2(w) };
    }
    sumsq_f64_lanes(w)
}

/// [`sumsq_f64_lanes`] compiled for AVX2 (4-lane f64 vectors instead of SSE2's 2; no FMA,
/// so the same roundings in the same order: bit-identical results).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn sumsq_f64_avx2(w: &[f32]) -> f64 {
    sumsq_f64_lanes(w)
}

/// The lanes of [`sumsq_f64`].
#[inline(always)]
fn sumsq_f64_lanes(w: &[f32]) -> f64 {
    const L: usize = 8;
    let mut acc = [0.0f64; L];
    let wc = w.chunks_exact(L);
    let wt = wc.remainder();
    for x in wc {
        for l in 0..L {
            let x = x[l] as f64;
            acc[l] += x * x;
        }
    }
    for (l, &x) in wt.iter().enumerate() {
        acc[l] += x as f64 * x as f64;
    }
    acc.iter().sum()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tensor::Tensor;
    use rand::{Rng, SeedableRng};

    /// A layer with W0 in `dtype`, f32 adapter tensors, `s·B·A` about a tenth of W0.
    fn layer(d_out: usize, d_in: usize, r: usize, dtype: DType, dora: bool, seed: u64) -> Layer {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let mut v = |n: usize, sc: f32| -> Vec<f32> {
            (0..n).map(|_| rng.gen_range(-1.0f32..1.0) * sc).collect()
        };
        let t = |shape: Vec<usize>, vals: Vec<f32>, dt: DType| {
            Tensor::from_f32(dt, shape, &vals).unwrap()
        };
        Layer {
            weight: t(vec![d_out, d_in], v(d_out * d_in, 0.05), dtype),
            bias: None,
            lora_a: t(vec![r, d_in], v(r * d_in, 0.05), DType::F32),
            lora_b: t(vec![d_out, r], v(d_out * r, 0.05), DType::F32),
            magnitude: dora.then(|| t(vec![d_out], v(d_out, 1.0), DType::F32)),
            scaling: 2.0,
            fan_in_fan_out: false,
        }
    }

    /// Sizes off every tile: one block on one thread, and several blocks on every core with
    /// ragged row blocks and column panels; ranks below, at and above the 16-wide tiles.
    const SIZES: [(usize, usize, usize); 4] =
        [(37, 101, 3), (333, 1031, 16), (290, 1500, 33), (16, 512, 8)];

    #[test]
    fn merge_is_bit_identical_to_the_whole_matrix_merge() {
        for (i, &(d_out, d_in, r)) in SIZES.iter().enumerate() {
            for dtype in [DType::F32, DType::F16, DType::BF16] {
                for dora in [true, false] {
                    let l = layer(d_out, d_in, r, dtype, dora, i as u64);
                    let want = Tensor::from_f32(
                        dtype,
                        vec![d_out, d_in],
                        &super::super::merged_weight(&l).unwrap(),
                    )
                    .unwrap();
                    let mut out = vec![0u8; want.as_bytes().len()];
                    let g = merged_weight_into(&l, &mut out).unwrap();
                    assert!(
                        out == want.as_bytes(),
                        "{d_out}x{d_in} r{r} {dtype} dora={dora}"
                    );
                    match g {
                        Some(g) => {
                            let want_g = super::super::magnitude_scale(&l).unwrap().unwrap();
                            assert_eq!(g.len(), d_out);
                            for (a, b) in g.iter().zip(&want_g) {
                                assert!((a - b).abs() <= 1e-5 * b.abs(), "g {a} vs {b}");
                            }
                        }
                        None => assert!(!dora),
                    }
                }
            }
        }
    }

    #[test]
    fn unmerge_is_bit_identical_to_the_whole_matrix_unmerge() {
        for (i, &(d_out, d_in, r)) in SIZES.iter().enumerate() {
            for dtype in [DType::F32, DType::F16, DType::BF16] {
                let l = layer(d_out, d_in, r, dtype, true, 10 + i as u64);
                let mut merged = vec![0u8; l.weight.len() * dtype.size()];
                let g = merged_weight_into(&l, &mut merged).unwrap().unwrap();
                let mut wl = l.clone();
                wl.weight = Tensor::from_bytes(dtype, vec![d_out, d_in], &merged).unwrap();
                wl.magnitude = None;
                let want =
                    crate::adapter::compute::unmerge_weight(&wl.weight.to_f32(), &wl, Some(&g))
                        .unwrap();
                let want = Tensor::from_f32(dtype, vec![d_out, d_in], &want).unwrap();
                let mut out = vec![0u8; merged.len()];
                unmerged_weight_into(&wl, Some(&g), &mut out).unwrap();
                assert!(out == want.as_bytes(), "{d_out}x{d_in} r{r} {dtype}");
                // And W0 comes back to the dtype's rounding.
                let back = Tensor::from_bytes(dtype, vec![d_out, d_in], &out)
                    .unwrap()
                    .to_f64();
                let e = crate::tensor::rel_l2(&back, &l.weight.to_f64());
                assert!(
                    e < 4.0 * dtype.unit_roundoff(),
                    "{dtype}: unmerge rel error {e:.2e}"
                );
            }
        }
    }

    #[test]
    fn non_finite_merged_element_is_named() {
        let mut l = layer(40, 600, 4, DType::F32, false, 3);
        let mut a = l.lora_a.to_f32();
        a[2 * 600 + 77] = f32::MAX;
        l.lora_a = Tensor::from_f32(DType::F32, vec![4, 600], &a).unwrap();
        let mut b = l.lora_b.to_f32();
        b[33 * 4 + 2] = 1e30;
        l.lora_b = Tensor::from_f32(DType::F32, vec![40, 4], &b).unwrap();
        let mut out = vec![0u8; 40 * 600 * 4];
        let e = merged_weight_into(&l, &mut out).unwrap_err().to_string();
        assert!(e.contains("row 33, column 77"), "{e}");
    }

    #[test]
    fn wrong_buffer_and_fan_in_fan_out_are_refused() {
        let l = layer(20, 30, 2, DType::BF16, true, 4);
        assert!(merged_weight_into(&l, &mut [0u8; 7])
            .unwrap_err()
            .to_string()
            .contains("output buffer"));
        let mut f = l.clone();
        f.fan_in_fan_out = true;
        f.weight = Tensor::from_f32(DType::BF16, vec![30, 20], &vec![0.0; 600]).unwrap();
        assert!(merged_weight_into(&f, &mut [0u8; 1200])
            .unwrap_err()
            .to_string()
            .contains("fan_in_fan_out"));
    }

    #[test]
    fn bf16_rounding_is_halfs() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let mut vals: Vec<f32> = vec![
            0.0,
            -0.0,
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::NAN,
            -f32::NAN,
            f32::from_bits(0x7f80_0001),
            f32::MAX,
            f32::MIN,
            f32::MIN_POSITIVE,
            f32::from_bits(1),
            f32::from_bits(0x7f7f_8000),
            f32::from_bits(0x7f7f_ffff),
        ];
        // Every tie and near-tie pattern of the dropped half, odd and even results.
        for hi in [0x3f80u32, 0x3f81, 0x0001, 0x7f7e, 0xbf80, 0xbf81] {
            for lo in [0u32, 1, 0x7fff, 0x8000, 0x8001, 0xffff] {
                vals.push(f32::from_bits(hi << 16 | lo));
            }
        }
        vals.extend((0..100_000).map(|_| f32::from_bits(rng.gen::<u32>())));
        for v in vals {
            let want = bf16::from_f32(v).to_bits();
            assert_eq!(bf16_bits(v), want, "{v:e} ({:#010x})", v.to_bits());
            let back = f32::from_bits((want as u32) << 16);
            if !v.is_nan() {
                assert_eq!(back.to_bits(), bf16::from_bits(want).to_f32().to_bits());
            }
        }
    }

    #[test]
    fn figure2_matches_the_row_loop() {
        for (i, &(d_out, d_in, r)) in SIZES.iter().enumerate() {
            for dtype in [DType::F32, DType::BF16] {
                for dora in [true, false] {
                    let l = layer(d_out, d_in, r, dtype, dora, 20 + i as u64);
                    let got = figure2(&l).unwrap();
                    // The same layer stored [d_in, d_out] takes the per-row f64 loop.
                    let mut t = l.clone();
                    let w = l.weight.to_f32();
                    let wt = crate::adapter::compute::transpose(&w, d_out, d_in);
                    t.weight = Tensor::from_f32(dtype, vec![d_in, d_out], &wt).unwrap();
                    t.fan_in_fan_out = true;
                    let want = crate::adapter::stats::figure2(&t).unwrap();
                    // Δ in f32, the sums in f64, against the f64 loop: all three to about
                    // f32's unit roundoff (ΔD, a small difference, kept by Lagrange's
                    // identity; 1e-8 seen).
                    for (a, b) in [(got.0, want.0), (got.1, want.1), (got.2, want.2)] {
                        let tol = 1e-7;
                        assert!(
                            (a - b).abs() <= tol * b.abs(),
                            "{d_out}x{d_in} {dtype} dora={dora}: {a:e} vs {b:e}"
                        );
                    }
                }
            }
        }
    }
}
