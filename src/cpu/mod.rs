//! The CPU path of a DoRA layer (docs/design.md §1, PEFT semantics): the norm, the forward and
//! the backward, in f32 arithmetic with every product through [`gemm::gemm`].
//!
//! Precision and dtypes: each tensor keeps its own storage dtype and is widened to f32 once
//! (an f32 tensor is borrowed, not copied). Every intermediate (U, z, dz, the norm) stays in
//! f32; only the outputs are rounded: `y` and `grad_x` to x's dtype (the computation dtype),
//! each parameter gradient to its parameter's dtype. PEFT rounds some intermediates to the
//! activation dtype; here low-precision outputs carry little more than their final rounding
//! (about half of PEFT's error on the golden f16/bf16 cases, and PEFT's own f32-level error
//! on the f32 gradients of the mixed-dtype cases).
//!
//! The norm is never computed from a materialised `V = W0 + s·B·A`:
//! `n_j² = ‖W0_j‖² + Σ_k B_jk·(2s·P_jk + s²·(B·G)_jk)` with `P = W0·Aᵀ [d_out, r]` and
//! `G = A·Aᵀ [r, r]`. For a row-major W0 one pass over it, a cache-sized block of rows at a
//! time on each core, yields both `‖W0_j‖²` and P (and, for a decode-sized forward in
//! [`run`], `x·W0ᵀ` too), so the norm reads W0 once; nothing `d_out × d_in` is
//! allocated (except by [`merged_weight`], whose output is that size). The expansion loses
//! accuracy by cancellation when `s·B_j·A ≈ −W0_j` (then `n_j ≪ ‖W0_j‖`, and the absolute
//! error of `n_j²` is about `2⁻²⁴·‖W0_j‖²`): such rows (expanded `n_j²` below 1/32 of
//! `‖W0_j‖² + ‖s·B_j·A‖²`) are detected and recomputed from the row itself in f64, which
//! costs O(d_in·r) per row and never happens for typical adapters (`s·B·A` a fraction of W0).
//! A row that is exactly zero gives `n_j = 0`, hence `g_j = 0`, never NaN.
//!
//! `fan_in_fan_out` weights (`[d_in, d_out]`, GPT-2 `Conv1D`) are read through strides; they
//! are never copied to transpose them.
//!
//! Inference callers that run the same layer repeatedly compute `g` once with
//! [`magnitude_scale`] and call [`forward_with_scale`], which skips the norm entirely (one
//! product with W0 instead of a product and a sum of squares over it).
//!
//! Inputs are not checked for NaN/Inf here (that is a pass over W0); [`crate::case`] checks
//! every input it reads, and [`Layer::check_finite`] does it for other callers.

pub mod gemm;
pub mod multi;
pub mod ops;
pub mod reference;
pub mod rows;

use crate::dtype::DType;
use crate::layer::{GradMode, Grads, Layer, Outputs, Shape, NORM_EPS};
use crate::tensor::{Tensor, TensorData};
use anyhow::{ensure, Result};
use gemm::{gemm, View, ViewMut};
use std::borrow::Cow;

/// ε as f32 (1e-12 is a normal f32).
const EPS: f32 = NORM_EPS as f32;

/// A row whose expanded `n_j²` falls below this fraction of its scale (`‖W0_j‖² +
/// ‖s·B_j·A‖²`) is recomputed directly: above it the expansion's relative error on `n_j` is
/// at most about 16·2⁻²⁴ ≈ 1e-6; below it cancellation would dominate.
const CANCELLATION_RATIO: f32 = 1.0 / 32.0;

/// Below this many elements a streaming pass runs on one thread (spawning costs more).
const PAR_MIN_ELEMS: usize = 1 << 18;

/// Elements of W0 per block of [`Params::fused_w0_pass`] and of the Figure-2 pass
/// ([`rows::figure2`]), rounded to whole rows and clamped to 16–1,024 rows (f32: about
/// 4 MiB, a core's share of the last-level cache; the `gemm` crate repacks the small
/// operand once per block, so larger blocks pay that less often). Measured on
/// 4096 × 4096 f32, `c = 17`: 64-row blocks 8.0 ms, 128 rows 7.3 ms, 256 rows 7.2 ms,
/// 512 rows 7.3 ms.
const W0_BLOCK_ELEMS: usize = 1 << 20;

/// The values of `t` as f32: borrowed when `t` is f32, widened once otherwise.
fn widen(t: &Tensor) -> Cow<'_, [f32]> {
    match t.data() {
        TensorData::F32(v) => Cow::Borrowed(v.as_slice()),
        _ => Cow::Owned(t.to_f32()),
    }
}

/// An f32 result rounded to `dtype` (moved, not copied, when `dtype` is f32).
fn into_tensor(dtype: DType, shape: Vec<usize>, v: Vec<f32>) -> Tensor {
    let r = match dtype {
        DType::F32 => Tensor::new(shape, TensorData::F32(v)),
        _ => Tensor::from_f32(dtype, shape, &v),
    };
    r.expect("output length matches its shape by construction")
}

/// Threads for streaming passes: all the cores the process may use.
fn threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// Sum of squares with 16 independent f32 lanes (vectorisable, and a shorter summation
/// chain than a single accumulator).
fn sumsq(row: &[f32]) -> f32 {
    let mut acc = [0.0f32; 16];
    let mut chunks = row.chunks_exact(16);
    for c in &mut chunks {
        for (a, v) in acc.iter_mut().zip(c) {
            *a += v * v;
        }
    }
    let tail: f32 = chunks.remainder().iter().map(|v| v * v).sum();
    acc.iter().sum::<f32>() + tail
}

/// Splits `out` into one contiguous piece per thread and runs `f(first_index, piece)` on
/// each, in parallel when `work` (elements read) is large enough to pay for the threads.
fn par_rows<F>(out: &mut [f32], work: usize, f: F)
where
    F: Fn(usize, &mut [f32]) + Sync,
{
    let nt = threads().min(out.len().max(1));
    if nt <= 1 || work < PAR_MIN_ELEMS {
        f(0, out);
        return;
    }
    let per = out.len().div_ceil(nt);
    on_threads(out.chunks_mut(per).enumerate(), |(i, piece)| {
        f(i * per, piece)
    });
}

/// Runs `f` on every part: the first on the calling thread, each other one on a scoped
/// thread of its own; returns when all are done (a panic in any is resumed here).
fn on_threads<P: Send, F: Fn(P) + Sync>(parts: impl IntoIterator<Item = P>, f: F) {
    let mut parts = parts.into_iter();
    let first = parts.next();
    std::thread::scope(|sc| {
        for p in parts {
            let f = &f;
            sc.spawn(move || f(p));
        }
        if let Some(p) = first {
            f(p);
        }
    });
}

/// One layer's parameters as f32 slices, with the sizes validated.
struct Params<'a> {
    d_in: usize,
    d_out: usize,
    r: usize,
    s: f32,
    fan_in_fan_out: bool,
    weight: Cow<'a, [f32]>,
    a: Cow<'a, [f32]>,
    b: Cow<'a, [f32]>,
    bias: Option<Cow<'a, [f32]>>,
    m: Option<Cow<'a, [f32]>>,
}

/// The pieces of the norm that the backward reuses.
struct NormParts {
    /// n `[d_out]`.
    n: Vec<f32>,
    /// B·G = B·(A·Aᵀ) `[d_out, r]` (the exact gradient needs it).
    bg: Vec<f32>,
    /// P = W0·Aᵀ `[d_out, r]` (so does it).
    p: Vec<f32>,
}

impl<'a> Params<'a> {
    fn new(layer: &'a Layer) -> Result<Self> {
        let (d_in, d_out, r) = layer.dims()?;
        Ok(Self {
            d_in,
            d_out,
            r,
            s: layer.scaling as f32,
            fan_in_fan_out: layer.fan_in_fan_out,
            weight: widen(&layer.weight),
            a: widen(&layer.lora_a),
            b: widen(&layer.lora_b),
            bias: layer.bias.as_ref().map(widen),
            m: layer.magnitude.as_ref().map(widen),
        })
    }

    /// W0 as `[d_out, d_in]`, through strides when stored `[d_in, d_out]`.
    fn w0(&self) -> View<'_, f32> {
        if self.fan_in_fan_out {
            View::new(&self.weight, self.d_in, self.d_out).t()
        } else {
            View::new(&self.weight, self.d_out, self.d_in)
        }
    }

    /// A `[r, d_in]`.
    fn a(&self) -> View<'_, f32> {
        View::new(&self.a, self.r, self.d_in)
    }

    /// B `[d_out, r]`.
    fn b(&self) -> View<'_, f32> {
        View::new(&self.b, self.d_out, self.r)
    }

    /// `‖W0_j‖²` for every output row j: one streaming pass over W0, split over the cores.
    fn row_sumsq(&self) -> Vec<f32> {
        let (d_in, d_out) = (self.d_in, self.d_out);
        let w: &[f32] = &self.weight;
        let mut out = vec![0.0f32; d_out];
        if self.fan_in_fan_out {
            // Rows of W0 are columns of the storage: walk storage rows (contiguous) and
            // accumulate each thread's range of columns. Each column is one long serial sum
            // here (no lanes), so it is accumulated in f64: the pass is memory-bound anyway.
            par_rows(&mut out, d_in * d_out, |j0, out| {
                let mut acc = vec![0.0f64; out.len()];
                for i in 0..d_in {
                    let seg = &w[i * d_out + j0..i * d_out + j0 + out.len()];
                    for (a, &v) in acc.iter_mut().zip(seg) {
                        *a += (v as f64) * (v as f64);
                    }
                }
                for (o, a) in out.iter_mut().zip(acc) {
                    *o = a as f32;
                }
            });
        } else {
            par_rows(&mut out, d_in * d_out, |j0, acc| {
                for (jj, a) in acc.iter_mut().enumerate() {
                    let j = j0 + jj;
                    *a = sumsq(&w[j * d_in..(j + 1) * d_in]);
                }
            });
        }
        out
    }

    /// One pass over W0 (row-major, not `fan_in_fan_out`) that yields both `‖W0_j‖²`
    /// `[d_out]` and `W0·Lᵀ` `[d_out, c]` for a small `L [c, d_in]` (A for the norm, `[x; A]`
    /// for a decode-sized forward); see [`w0_pass`]. One range of rows per core (one range
    /// below [`PAR_MIN_ELEMS`]), blocks of about [`W0_BLOCK_ELEMS`] elements (16 to 1,024
    /// rows). Measured on 4096 × 4096 f32 with `c = 17` (2 cores): 7.2 ms, against 9.6 ms
    /// for the product alone as one `[17, d_in]` by `W0ᵀ` product plus 2.4 ms for a separate
    /// pass of sums.
    fn fused_w0_pass(&self, l: &[f32], c: usize) -> (Vec<f32>, Vec<f32>) {
        let (d_in, d_out) = (self.d_in, self.d_out);
        debug_assert!(!self.fan_in_fan_out);
        let nt = if d_out * d_in < PAR_MIN_ELEMS {
            1
        } else {
            threads()
        };
        let br = (W0_BLOCK_ELEMS / d_in.max(1)).clamp(16, 1024);
        w0_pass(&self.weight, d_in, l, c, nt, br)
    }

    /// `n` from its expansion, given `‖W0_j‖²` `[d_out]` and `P = W0·Aᵀ` `[d_out, r]`.
    fn norm_from(&self, w2: &[f32], pm: Vec<f32>) -> NormParts {
        let p = View::new(&pm, self.d_out, self.r);
        let (d_out, r, s) = (self.d_out, self.r, self.s);
        // G = A·Aᵀ [r, r], then B·G [d_out, r]: O(r²·(d_in + d_out)), no pass over W0.
        let mut gram = vec![0.0f32; r * r];
        gemm(
            1.0,
            self.a(),
            self.a().t(),
            0.0,
            ViewMut::new(&mut gram, r, r),
        );
        let mut bg = vec![0.0f32; d_out * r];
        gemm(
            1.0,
            self.b(),
            View::new(&gram, r, r),
            0.0,
            ViewMut::new(&mut bg, d_out, r),
        );
        let b = self.b();
        let n = (0..d_out)
            .map(|j| {
                let (mut cross, mut quad) = (0.0f32, 0.0f32);
                for k in 0..r {
                    cross += b.at(j, k) * p.at(j, k);
                    quad += b.at(j, k) * bg[j * r + k];
                }
                // ‖W0_j‖² and ‖s·B_j·A‖² bound the cross term (|2s·B_j·P_j| ≤ their sum), so
                // their sum is the scale the expansion's rounding error is relative to.
                let scale = w2[j] + s * s * quad;
                let n2 = w2[j] + 2.0 * s * cross + s * s * quad;
                if n2 < scale * CANCELLATION_RATIO {
                    // s·B_j·A ≈ −W0_j: the expansion would lose most of its digits (its error
                    // relative to n_j² is about 2⁻²⁴·scale/n_j²). Recompute this row directly.
                    self.direct_row_norm(j)
                } else {
                    n2.sqrt()
                }
            })
            .collect();
        NormParts { n, bg, p: pm }
    }

    /// `‖W0_j + s·B_j·A‖₂` of one row from the row itself, accumulated in f64: the fallback
    /// for rows where the expansion cancels. O(d_in·r); never taken for typical adapters.
    fn direct_row_norm(&self, j: usize) -> f32 {
        let (w0, a, b, s) = (self.w0(), self.a(), self.b(), self.s as f64);
        let mut acc = 0.0f64;
        for i in 0..self.d_in {
            let mut v = w0.at(j, i) as f64;
            for k in 0..self.r {
                v += s * b.at(j, k) as f64 * a.at(k, i) as f64;
            }
            acc += v * v;
        }
        acc.sqrt() as f32
    }

    /// The norm on its own. Row-major W0: one pass that yields both `‖W0_j‖²` and
    /// `P = W0·Aᵀ` ([`Self::fused_w0_pass`]). `fan_in_fan_out` W0: a streaming sum of squares
    /// over the storage rows and the product through strides.
    fn norm(&self) -> NormParts {
        let (d_out, r) = (self.d_out, self.r);
        if !self.fan_in_fan_out {
            let (w2, p) = self.fused_w0_pass(&self.a, r);
            return self.norm_from(&w2, p);
        }
        let w2 = self.row_sumsq();
        let mut p = vec![0.0f32; d_out * r];
        gemm(
            1.0,
            self.w0(),
            self.a().t(),
            0.0,
            ViewMut::new(&mut p, d_out, r),
        );
        self.norm_from(&w2, p)
    }
}

/// `(‖W_j‖² [d_out], W·Lᵀ [d_out, c])` for a row-major `W [d_out, d_in]` and `L [c, d_in]`,
/// reading W once: `nt` threads (at most one per 16 rows) each take a contiguous range of
/// rows and walk it in blocks of `br` rows, summing each block's squares and multiplying
/// it by `Lᵀ` on the same thread while the block is still in cache.
///
/// # Panics
/// When `w` or `l` is not a whole number of `d_in`-element rows, or `l` has not `c` rows.
fn w0_pass(
    w: &[f32],
    d_in: usize,
    l: &[f32],
    c: usize,
    nt: usize,
    br: usize,
) -> (Vec<f32>, Vec<f32>) {
    assert!(
        d_in > 0 && w.len() % d_in == 0 && l.len() == c * d_in,
        "w0_pass shapes"
    );
    let d_out = w.len() / d_in;
    let mut w2 = vec![0.0f32; d_out];
    let mut prod = vec![0.0f32; d_out * c];
    let nt = nt.min(d_out.div_ceil(16)).max(1);
    let per = d_out.div_ceil(nt).max(1);
    let br = br.max(1);
    let work = |j0: usize, w2: &mut [f32], prod: &mut [f32]| {
        let mut b = 0;
        while b < w2.len() {
            let n = br.min(w2.len() - b);
            let blk = &w[(j0 + b) * d_in..(j0 + b + n) * d_in];
            for (o, row) in w2[b..b + n].iter_mut().zip(blk.chunks_exact(d_in)) {
                *o = sumsq(row);
            }
            gemm::gemm_on_this_thread(
                1.0,
                View::new(blk, n, d_in),
                View::new(l, c, d_in).t(),
                0.0,
                ViewMut::new(&mut prod[b * c..(b + n) * c], n, c),
            );
            b += n;
        }
    };
    let parts = w2
        .chunks_mut(per)
        .zip(prod.chunks_mut((per * c).max(1)))
        .enumerate();
    on_threads(parts, |(i, (w2p, pp))| work(i * per, w2p, pp));
    (w2, prod)
}

/// g = m / max(n, ε).
fn scale_from(m: &[f32], n: &[f32]) -> Vec<f32> {
    m.iter().zip(n).map(|(m, n)| m / n.max(EPS)).collect()
}

/// `n_j = ‖W0_j + s·B_j·A‖₂` for every output row j, in f32 arithmetic, without building
/// `W0 + s·B·A` (from `‖W0_j‖²`, `W0·Aᵀ` and `A·Aᵀ`; see the module notes on cancellation).
///
/// # Errors
/// An invalid layer, naming the tensor and its shape.
pub fn norm(layer: &Layer) -> Result<Vec<f32>> {
    Ok(Params::new(layer)?.norm().n)
}

/// `g = m / max(n, ε)` `[d_out]` (ε = [`NORM_EPS`]; a zero row gives g = 0, never NaN), or
/// `None` for plain LoRA. Compute it once and pass it to [`forward_with_scale`] to run a
/// frozen layer repeatedly without recomputing the norm.
///
/// # Errors
/// An invalid layer, naming the tensor and its shape.
pub fn magnitude_scale(layer: &Layer) -> Result<Option<Vec<f32>>> {
    let p = Params::new(layer)?;
    Ok(p.m.as_ref().map(|m| scale_from(m, &p.norm().n)))
}

/// `y = g ⊙ (x·W0ᵀ + s·(x·Aᵀ)·Bᵀ) + b` in x's dtype.
///
/// # Errors
/// An invalid layer or `x` shape, naming the tensor.
pub fn forward(layer: &Layer, x: &Tensor) -> Result<Tensor> {
    Ok(run(layer, x, None, GradMode::Detached)?.y)
}

/// The forward with a precomputed `g` (from [`magnitude_scale`]): `Some(g)` for DoRA,
/// `None` for plain LoRA. For inference, where the adapter is frozen and the same layer runs
/// for every token batch, this costs one product with W0 and no norm.
///
/// # Errors
/// An invalid layer or `x` shape; `scale` of the wrong length; `scale` given for a LoRA
/// layer or missing for a DoRA one.
pub fn forward_with_scale(layer: &Layer, x: &Tensor, scale: Option<&[f32]>) -> Result<Tensor> {
    let shape = layer.shape_for(x)?;
    let p = Params::new(layer)?;
    match (scale, &p.m) {
        (Some(g), Some(_)) => ensure!(
            g.len() == shape.d_out,
            "scale g has {} values, expected d_out = {}",
            g.len(),
            shape.d_out
        ),
        (None, None) => {}
        (Some(_), None) => anyhow::bail!("scale g given for a plain LoRA layer (no magnitude)"),
        (None, Some(_)) => {
            anyhow::bail!("scale g missing for a DoRA layer: compute it with magnitude_scale")
        }
    }
    let xw = widen(x);
    let xv = View::new(&xw, shape.t, shape.d_in);
    let mut z = vec![0.0f32; shape.t * shape.d_out];
    gemm(
        1.0,
        xv,
        p.w0().t(),
        0.0,
        ViewMut::new(&mut z, shape.t, shape.d_out),
    );
    add_adapter(&p, shape, xv, &mut z);
    compose_in_place(&p, shape, &mut z, scale);
    Ok(into_tensor(x.dtype(), vec![shape.t, shape.d_out], z))
}

/// z += s·(x·Aᵀ)·Bᵀ; returns U = x·Aᵀ `[T, r]`.
///
/// Decode-sized calls (T ≤ [`gemm::SMALL_M`]) run both products on the calling thread: they
/// are `2·T·r·(d_in + d_out)` FLOPs, far less than waking a pool's threads costs (a wait
/// for a core on a loaded machine).
fn add_adapter(p: &Params<'_>, shape: Shape, xv: View<'_, f32>, z: &mut [f32]) -> Vec<f32> {
    let (t, r, d_out) = (shape.t, shape.r, shape.d_out);
    let product = if t <= gemm::SMALL_M {
        gemm::gemm_on_this_thread
    } else {
        gemm
    };
    let mut u = vec![0.0f32; t * r];
    product(1.0, xv, p.a().t(), 0.0, ViewMut::new(&mut u, t, r));
    product(
        p.s,
        View::new(&u, t, r),
        p.b().t(),
        1.0,
        ViewMut::new(&mut z[..t * d_out], t, d_out),
    );
    u
}

/// y = g ⊙ z + b (g = 1 when `None`), in place.
fn compose_in_place(p: &Params<'_>, shape: Shape, y: &mut [f32], g: Option<&[f32]>) {
    for row in y[..shape.t * shape.d_out].chunks_exact_mut(shape.d_out) {
        match (g, &p.bias) {
            (Some(g), Some(b)) => row
                .iter_mut()
                .zip(g.iter().zip(b.iter()))
                .for_each(|(v, (g, b))| *v = *v * g + b),
            (Some(g), None) => row.iter_mut().zip(g).for_each(|(v, g)| *v *= g),
            (None, Some(b)) => row.iter_mut().zip(b.iter()).for_each(|(v, b)| *v += b),
            (None, None) => {}
        }
    }
}

/// y = g ⊙ z + b (g = 1 when `None`), as f32.
fn compose(p: &Params<'_>, shape: Shape, z: &[f32], g: Option<&[f32]>) -> Vec<f32> {
    let d_out = shape.d_out;
    let mut y = z[..shape.t * d_out].to_vec();
    for row in y.chunks_exact_mut(d_out) {
        if let Some(g) = g {
            row.iter_mut().zip(g).for_each(|(v, g)| *v *= g);
        }
        if let Some(b) = &p.bias {
            row.iter_mut().zip(b.iter()).for_each(|(v, b)| *v += b);
        }
    }
    y
}

/// Forward and, when `grad_y [T, d_out]` is given, backward of the layer.
///
/// The norm needs `‖W0_j‖²` and `P = W0·Aᵀ` (its cross term). For a row-major W0 and
/// decode-sized T both come from the pass that computes `x·W0ᵀ`, so W0 is read once for the
/// whole forward; for larger T they take one pass of their own beside the forward's GEMM. A
/// `fan_in_fan_out` W0 (`[d_in, d_out]`) is read twice: by `[x; A]·W0ᵀ` through strides and
/// by a pass of sums of squares. The backward computes `dz·W0` (with `GradMode::Exact`,
/// stacked with the `r` rows `(diag(k)·B)ᵀ` so the exact term's product with W0 shares the
/// same pass).
///
/// Gradients (docs/design.md §1): `Detached` treats the norm as a constant, as PEFT does;
/// `Exact` adds the norm's dependence on A and B through `k = m ⊙ c / n³`. Where
/// `n_j < ε`, `g_j = m_j/ε` does not depend on A or B, so `k_j` is defined as 0 there: a
/// zero row gets finite gradients (PEFT's 0/0 would give NaN).
///
/// Outputs: `y` and `grad_x` in x's dtype, `grad_lora_a`/`grad_lora_b`/`grad_magnitude` in
/// the dtype of `lora_A`/`lora_B`/`magnitude`.
///
/// # Errors
/// An invalid layer, `x` or `grad_y` shape, naming the tensor.
pub fn run(layer: &Layer, x: &Tensor, grad_y: Option<&Tensor>, mode: GradMode) -> Result<Outputs> {
    let shape = layer.call_shape(x, grad_y)?;
    let p = Params::new(layer)?;
    let Shape { t, d_in, d_out, r } = shape;
    let dora = p.m.is_some();

    // --- forward ---------------------------------------------------------------------
    let xw = widen(x);
    let xv = View::new(&xw, t, d_in);
    let mut z = vec![0.0f32; t * d_out];
    // For DoRA, the norm's pieces: ‖W0_j‖² [d_out] and P = W0·Aᵀ [d_out, r].
    let w2p: Option<(Vec<f32>, Vec<f32>)> = if !dora {
        gemm(1.0, xv, p.w0().t(), 0.0, ViewMut::new(&mut z, t, d_out));
        None
    } else if !p.fan_in_fan_out && t <= gemm::SMALL_M {
        // Decode-sized: one pass over W0 yields the sums of squares and W0·[x; A]ᵀ
        // ([d_out, T + r]): the first T columns are zᵀ, the last r are P.
        let c = t + r;
        let mut xa = Vec::with_capacity(c * d_in);
        xa.extend_from_slice(&xw);
        xa.extend_from_slice(&p.a);
        let (w2, prod) = p.fused_w0_pass(&xa, c);
        let mut pm = Vec::with_capacity(d_out * r);
        for (j, row) in prod.chunks_exact(c).enumerate() {
            for (i, &v) in row[..t].iter().enumerate() {
                z[i * d_out + j] = v;
            }
            pm.extend_from_slice(&row[t..]);
        }
        Some((w2, pm))
    } else if !p.fan_in_fan_out {
        // Many tokens: x·W0ᵀ is bound by arithmetic, and the norm's pieces take their own
        // pass over W0 (about a tenth of the product's time at T = 256; stacking A's r rows
        // onto x instead made matrixmultiply's product slower by more than that).
        gemm(1.0, xv, p.w0().t(), 0.0, ViewMut::new(&mut z, t, d_out));
        Some(p.fused_w0_pass(&p.a, r))
    } else {
        // W0 stored [d_in, d_out]: [x; A]·W0ᵀ as one product through strides (rows T..T+r
        // are Pᵀ), the sums of squares from their own pass.
        let mut xa = Vec::with_capacity((t + r) * d_in);
        xa.extend_from_slice(&xw);
        xa.extend_from_slice(&p.a);
        let mut zp = vec![0.0f32; (t + r) * d_out];
        gemm(
            1.0,
            View::new(&xa, t + r, d_in),
            p.w0().t(),
            0.0,
            ViewMut::new(&mut zp, t + r, d_out),
        );
        z.copy_from_slice(&zp[..t * d_out]);
        let pt = View::new(&zp[t * d_out..], r, d_out);
        let pm = (0..d_out)
            .flat_map(|j| (0..r).map(move |k| pt.at(k, j)))
            .collect();
        Some((p.row_sumsq(), pm))
    };
    let parts = w2p.map(|(w2, pm)| p.norm_from(&w2, pm));
    let g: Option<Vec<f32>> = match (&p.m, &parts) {
        (Some(m), Some(np)) => Some(scale_from(m, &np.n)),
        _ => None,
    };
    let u = add_adapter(&p, shape, xv, &mut z);
    let z = &z[..];
    let y = into_tensor(
        x.dtype(),
        vec![t, d_out],
        compose(&p, shape, z, g.as_deref()),
    );
    let Some(gy) = grad_y else {
        return Ok(Outputs { y, grads: None });
    };

    // --- backward --------------------------------------------------------------------
    let dy = widen(gy);
    let exact = dora && mode == GradMode::Exact;
    // c_j = Σ_t dy ⊙ z = dL/dg_j.
    let c: Vec<f32> = if dora {
        let mut c = vec![0.0f32; d_out];
        for (dyr, zr) in dy.chunks_exact(d_out).zip(z.chunks_exact(d_out)) {
            for ((c, a), b) in c.iter_mut().zip(dyr).zip(zr) {
                *c += a * b;
            }
        }
        c
    } else {
        Vec::new()
    };
    // k_j = m_j·c_j / n_j³ (0 where n_j < ε); only for the exact gradient.
    let k: Vec<f32> = match (&p.m, &parts) {
        (Some(m), Some(np)) if exact => (0..d_out)
            .map(|j| {
                let n = np.n[j];
                if n < EPS {
                    0.0
                } else {
                    m[j] * c[j] / (n * n * n)
                }
            })
            .collect(),
        _ => Vec::new(),
    };
    // dzk = [dy ⊙ g; (diag(k)·B)ᵀ]  ([T (+ r), d_out]); for LoRA dz = dy itself.
    let extra = if exact { r } else { 0 };
    let dzk: Cow<'_, [f32]> = match &g {
        Some(g) => {
            let mut v = Vec::with_capacity((t + extra) * d_out);
            for row in dy.chunks_exact(d_out) {
                v.extend(row.iter().zip(g).map(|(a, b)| a * b));
            }
            if exact {
                let b = p.b();
                for kk in 0..r {
                    v.extend((0..d_out).map(|j| k[j] * b.at(j, kk)));
                }
            }
            Cow::Owned(v)
        }
        None => Cow::Borrowed(&dy[..]),
    };
    let dz = View::new(&dzk, t, d_out);
    // dzB = dz·B [T, r]
    let mut dzb = vec![0.0f32; t * r];
    gemm(1.0, dz, p.b(), 0.0, ViewMut::new(&mut dzb, t, r));
    let dzbv = View::new(&dzb, t, r);
    // [dx; Q] = dzk·W0 — the big product; Q = (diag(k)·B)ᵀ·W0 [r, d_in] for Exact.
    let mut dxq = vec![0.0f32; (t + extra) * d_in];
    gemm(
        1.0,
        View::new(&dzk, t + extra, d_out),
        p.w0(),
        0.0,
        ViewMut::new(&mut dxq, t + extra, d_in),
    );
    gemm(
        p.s,
        dzbv,
        p.a(),
        1.0,
        ViewMut::new(&mut dxq[..t * d_in], t, d_in),
    );
    // dB = s·dzᵀ·U [d_out, r]
    let mut db = vec![0.0f32; d_out * r];
    gemm(
        p.s,
        dz.t(),
        View::new(&u, t, r),
        0.0,
        ViewMut::new(&mut db, d_out, r),
    );
    // dA = s·(dz·B)ᵀ·x [r, d_in]
    let mut da = vec![0.0f32; r * d_in];
    gemm(p.s, dzbv.t(), xv, 0.0, ViewMut::new(&mut da, r, d_in));

    if let (true, Some(np)) = (exact, &parts) {
        let s = p.s;
        // dB −= s·diag(k)·(W0·Aᵀ + s·B·G)
        let pt = View::new(&np.p, d_out, r);
        for j in 0..d_out {
            for kk in 0..r {
                db[j * r + kk] -= s * k[j] * (pt.at(j, kk) + s * np.bg[j * r + kk]);
            }
        }
        // dA −= s·Q + s²·(Bᵀ·diag(k)·B)·A
        for (d, q) in da.iter_mut().zip(&dxq[t * d_in..]) {
            *d -= s * q;
        }
        let kb = View::new(&dzk[t * d_out..], r, d_out);
        let mut h = vec![0.0f32; r * r];
        gemm(1.0, kb, p.b(), 0.0, ViewMut::new(&mut h, r, r));
        gemm(
            -s * s,
            View::new(&h, r, r),
            p.a(),
            1.0,
            ViewMut::new(&mut da, r, d_in),
        );
    }
    dxq.truncate(t * d_in);

    let grad_magnitude = match (&layer.magnitude, &parts) {
        (Some(mt), Some(np)) => {
            let dm: Vec<f32> = c.iter().zip(&np.n).map(|(c, n)| c / n.max(EPS)).collect();
            Some(into_tensor(mt.dtype(), vec![d_out], dm))
        }
        _ => None,
    };
    Ok(Outputs {
        y,
        grads: Some(Grads {
            grad_x: into_tensor(x.dtype(), vec![t, d_in], dxq),
            grad_lora_a: into_tensor(layer.lora_a.dtype(), vec![r, d_in], da),
            grad_lora_b: into_tensor(layer.lora_b.dtype(), vec![d_out, r], db),
            grad_magnitude,
        }),
    })
}

/// `W' = diag(g)·(W0 + s·B·A)` as `[d_out, d_in]` row-major f32 (g = 1 for plain LoRA), for
/// merging an adapter into its base. Here V is materialised anyway (it is the output), so
/// the norm is taken from V's rows directly rather than from the expansion.
///
/// # Errors
/// An invalid layer, naming the tensor and its shape.
pub fn merged_weight(layer: &Layer) -> Result<Vec<f32>> {
    let p = Params::new(layer)?;
    let (d_in, d_out, r) = (p.d_in, p.d_out, p.r);
    let mut v = if p.fan_in_fan_out {
        // Transpose [d_in, d_out] -> [d_out, d_in] in tiles, so both sides stay in cache.
        let mut v = vec![0.0f32; d_out * d_in];
        const TILE: usize = 64;
        for j0 in (0..d_out).step_by(TILE) {
            for i0 in (0..d_in).step_by(TILE) {
                for i in i0..(i0 + TILE).min(d_in) {
                    for j in j0..(j0 + TILE).min(d_out) {
                        v[j * d_in + i] = p.weight[i * d_out + j];
                    }
                }
            }
        }
        v
    } else {
        p.weight.to_vec()
    };
    gemm(
        p.s,
        p.b(),
        View::new(&p.a, r, d_in),
        1.0,
        ViewMut::new(&mut v, d_out, d_in),
    );
    if let Some(m) = &p.m {
        let n: Vec<f32> = v.chunks_exact(d_in).map(|row| sumsq(row).sqrt()).collect();
        let g = scale_from(m, &n);
        for (row, g) in v.chunks_exact_mut(d_in).zip(g) {
            row.iter_mut().for_each(|e| *e *= g);
        }
    }
    Ok(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn w0_pass_matches_loops_for_any_thread_count_and_block() {
        // 101 rows: ranges of 16-row multiples or not, blocks that do and do not divide
        // them, more threads than cores and than 16-row groups allow.
        let (d_out, d_in, c) = (101, 37, 3);
        let w: Vec<f32> = (0..d_out * d_in)
            .map(|v| ((v * 29) % 97) as f32 * 0.02 - 0.9)
            .collect();
        let l: Vec<f32> = (0..c * d_in)
            .map(|v| ((v * 13) % 41) as f32 * 0.05 - 1.0)
            .collect();
        for nt in [1, 2, 3, 7] {
            for br in [1, 5, 16, 1024] {
                let (w2, prod) = w0_pass(&w, d_in, &l, c, nt, br);
                for j in 0..d_out {
                    let row = &w[j * d_in..(j + 1) * d_in];
                    let want: f64 = row.iter().map(|&v| v as f64 * v as f64).sum();
                    assert!(
                        (w2[j] as f64 - want).abs() <= 1e-5 * want,
                        "nt {nt} br {br} row {j}: sum of squares"
                    );
                    for k in 0..c {
                        let lk = &l[k * d_in..(k + 1) * d_in];
                        let want: f64 =
                            row.iter().zip(lk).map(|(&a, &b)| a as f64 * b as f64).sum();
                        let got = prod[j * c + k] as f64;
                        assert!(
                            (got - want).abs() <= 1e-5 * (1.0 + want.abs()),
                            "nt {nt} br {br} ({j},{k}): {got} vs {want}"
                        );
                    }
                }
            }
        }
    }
}
