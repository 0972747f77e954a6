//! The CPU side of the benchmark: the GEMM crate alone (the base layer, the floor), DoRA
//! unfused as PEFT performs it, and the CPU ceilings (memory copy bandwidth and the GEMM
//! crate's large sgemm rate).
//!
//! Everything here computes in f32 with `matrixmultiply` (the same crate the CPU path uses),
//! starting from tensors in their stored dtype: a bf16 row pays its conversions in every
//! implementation alike.

use super::inputs::InputSet;
use super::stats::Stats;
use crate::layer::NORM_EPS;
use crate::tensor::{Tensor, TensorData};
use anyhow::{ensure, Context, Result};
use std::borrow::Cow;
use std::hint::black_box;

/// `C[m×n] = alpha·op(A)·op(B) + beta·C`, all row-major and contiguous; `op(A)` is `A`
/// stored `[m, k]`, or `Aᵀ` with A stored `[k, m]` when `trans_a` (likewise B: `[k, n]` or
/// stored `[n, k]`).
///
/// # Errors
/// A slice shorter than its matrix.
#[allow(clippy::too_many_arguments)]
pub fn sgemm(
    m: usize,
    k: usize,
    n: usize,
    alpha: f32,
    a: &[f32],
    trans_a: bool,
    b: &[f32],
    trans_b: bool,
    beta: f32,
    c: &mut [f32],
) -> Result<()> {
    ensure!(
        a.len() >= m * k,
        "sgemm: A has {} elements, needs {m}×{k}",
        a.len()
    );
    ensure!(
        b.len() >= k * n,
        "sgemm: B has {} elements, needs {k}×{n}",
        b.len()
    );
    ensure!(
        c.len() >= m * n,
        "sgemm: C has {} elements, needs {m}×{n}",
        c.len()
    );
    use crate::cpu::gemm::{gemm, View, ViewMut};
    // op(A) is A [m, k] or the transposed view of A stored [k, m]; likewise B.
    let a = if trans_a {
        View::new(&a[..m * k], k, m).t()
    } else {
        View::new(&a[..m * k], m, k)
    };
    let b = if trans_b {
        View::new(&b[..k * n], n, k).t()
    } else {
        View::new(&b[..k * n], k, n)
    };
    gemm(alpha, a, b, beta, ViewMut::new(&mut c[..m * n], m, n));
    Ok(())
}

/// The tensor's values as f32: borrowed when already f32, converted otherwise.
pub fn f32_of(t: &Tensor) -> Cow<'_, [f32]> {
    match t.data() {
        TensorData::F32(v) => Cow::Borrowed(v.as_slice()),
        _ => Cow::Owned(t.to_f32()),
    }
}

/// Scratch memory of the CPU baselines for one shape, allocated once outside the timed
/// region (as PyTorch's caching allocator would hand PEFT its temporaries).
#[derive(Debug)]
pub struct Workspace {
    /// `B·A [O, I]`: the temporary PEFT materialises.
    pub ba: Vec<f32>,
    /// `V = W0 + s·B·A [O, I]`.
    pub v: Vec<f32>,
    /// `n [O]`, `g [O]`.
    pub n: Vec<f32>,
    /// g.
    pub g: Vec<f32>,
    /// Base product `x·W0ᵀ [T, O]` (saved for backward).
    pub base: Vec<f32>,
    /// `U = x·Aᵀ [T, r]`.
    pub u: Vec<f32>,
    /// `lora = U·Bᵀ [T, O]`.
    pub lora: Vec<f32>,
    /// The output in f32 `[T, O]`.
    pub y: Vec<f32>,
    /// Elementwise temporaries of the backward `[T, O]`.
    pub tmp: Vec<f32>,
    /// Gradient of the base product / of the LoRA branch `[T, O]`.
    pub dlora: Vec<f32>,
    /// `dU [T, r]`.
    pub du: Vec<f32>,
    /// `dx [T, I]`.
    pub dx: Vec<f32>,
    /// `dA [r, I]`, `dB [O, r]`, `dm [O]`.
    pub da: Vec<f32>,
    /// dB.
    pub db: Vec<f32>,
    /// dm.
    pub dm: Vec<f32>,
}

impl Workspace {
    /// Scratch for `t` tokens on a layer `d_in × d_out` of rank `r`.
    pub fn new(t: usize, d_in: usize, d_out: usize, r: usize) -> Self {
        let z = |n: usize| vec![0f32; n];
        Workspace {
            ba: z(d_out * d_in),
            v: z(d_out * d_in),
            n: z(d_out),
            g: z(d_out),
            base: z(t * d_out),
            u: z(t * r),
            lora: z(t * d_out),
            y: z(t * d_out),
            tmp: z(t * d_out),
            dlora: z(t * d_out),
            du: z(t * r),
            dx: z(t * d_in),
            da: z(r * d_in),
            db: z(d_out * r),
            dm: z(d_out),
        }
    }

    /// Bytes of the unfused DoRA's temporaries beyond its inputs and outputs (for the
    /// `extra_mem_bytes` column): `B·A` and `V` (two `d_out × d_in` matrices), n, g, and the
    /// `[T, O]` and `[T, r]` intermediates of forward and backward.
    pub fn unfused_extra_bytes(&self) -> usize {
        4 * (self.ba.len()
            + self.v.len()
            + self.n.len()
            + self.g.len()
            + self.base.len()
            + self.u.len()
            + self.lora.len()
            + self.tmp.len()
            + self.dlora.len()
            + self.du.len())
    }
}

/// The base layer alone through the GEMM crate: `y = x·W0ᵀ`, returned in x's dtype.
///
/// # Errors
/// Inconsistent shapes.
pub fn base_forward(set: &InputSet, ws: &mut Workspace) -> Result<Tensor> {
    let (d_in, d_out, _) = set.layer.dims()?;
    let t = set.x.shape()[0];
    let x = f32_of(&set.x);
    let w = f32_of(&set.layer.weight);
    sgemm(t, d_in, d_out, 1.0, &x, false, &w, true, 0.0, &mut ws.y)?;
    Tensor::from_f32(set.x.dtype(), vec![t, d_out], &ws.y[..t * d_out])
}

/// The base layer's own forward and backward (its weight is frozen, so `dx = dy·W0` only),
/// returning `(y, dx)` in x's dtype.
///
/// # Errors
/// Inconsistent shapes.
pub fn base_forward_backward(set: &InputSet, ws: &mut Workspace) -> Result<(Tensor, Tensor)> {
    let y = base_forward(set, ws)?;
    let (d_in, d_out, _) = set.layer.dims()?;
    let t = set.x.shape()[0];
    let dy = f32_of(&set.dy);
    let w = f32_of(&set.layer.weight);
    sgemm(t, d_out, d_in, 1.0, &dy, false, &w, false, 0.0, &mut ws.dx)?;
    let dx = Tensor::from_f32(set.x.dtype(), vec![t, d_in], &ws.dx[..t * d_in])?;
    Ok((y, dx))
}

/// One pass over W0 computing each row's sum of squares, split over the cores: what the norm
/// must do at least (the "one pass over W0" of the CPU target). Returns the row sums.
///
/// # Errors
/// Inconsistent shapes.
pub fn w0_pass(set: &InputSet, out: &mut [f32]) -> Result<()> {
    let (d_in, d_out, _) = set.layer.dims()?;
    ensure!(
        out.len() >= d_out,
        "w0_pass: output has {} < {d_out}",
        out.len()
    );
    let w = f32_of(&set.layer.weight);
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let rows_per = d_out.div_ceil(threads);
    std::thread::scope(|sc| {
        for (ci, chunk) in out[..d_out].chunks_mut(rows_per).enumerate() {
            let w = &w;
            sc.spawn(move || {
                for (k, o) in chunk.iter_mut().enumerate() {
                    let j = ci * rows_per + k;
                    *o = sum_squares(&w[j * d_in..(j + 1) * d_in]);
                }
            });
        }
    });
    Ok(())
}

/// Σ v² with eight independent accumulators: a plain `.sum()` is one serial chain of f32
/// adds (latency-bound, several times slower than memory); eight lanes let the compiler
/// vectorise, so the pass runs at memory speed, as the norm's floor should.
fn sum_squares(v: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let chunks = v.chunks_exact(8);
    let tail: f32 = chunks.remainder().iter().map(|x| x * x).sum();
    for c in chunks {
        for (a, x) in acc.iter_mut().zip(c) {
            *a += x * x;
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// DoRA's forward done the way PEFT does it (`peft.tuners.lora.dora.DoraLinearLayer`), one
/// pass per operation, in f32: materialise `B·A` (`d_out × d_in`), build `V = W0 + s·B·A`, take
/// its row norms, `g = m / max(n, ε)`, then `base = x·W0ᵀ`, `lora = (x·Aᵀ)·Bᵀ`,
/// `result_dora = (g − 1)·base + g·s·lora` and `y = base + result_dora` as separate passes.
/// PEFT builds `B·A` by pushing an identity matrix through both adapters; a direct product is
/// cheaper, so this baseline is, if anything, faster than PEFT's own passes.
/// The output is left in `ws.y` (f32); `base`, `u`, `lora`, `g`, `n` are kept for backward.
///
/// # Errors
/// Inconsistent shapes or a layer without magnitude.
pub fn unfused_forward(set: &InputSet, ws: &mut Workspace) -> Result<()> {
    let l = &set.layer;
    let (d_in, d_out, r) = l.dims()?;
    let t = set.x.shape()[0];
    let s = l.scaling as f32;
    let w = f32_of(&l.weight);
    let a = f32_of(&l.lora_a);
    let b = f32_of(&l.lora_b);
    let m = f32_of(
        l.magnitude
            .as_ref()
            .context("unfused DoRA needs a magnitude")?,
    );
    let x = f32_of(&set.x);
    // lora_weight = B·A, materialised.
    sgemm(d_out, r, d_in, 1.0, &b, false, &a, false, 0.0, &mut ws.ba)?;
    // weight = W0 + s·lora_weight (a new tensor).
    for ((v, w), ba) in ws.v.iter_mut().zip(w.iter()).zip(ws.ba.iter()) {
        *v = w + s * ba;
    }
    // weight_norm = ‖weight‖ per row (detached); mag_norm_scale = m / weight_norm.
    for j in 0..d_out {
        let row = &ws.v[j * d_in..(j + 1) * d_in];
        ws.n[j] = row.iter().map(|v| v * v).sum::<f32>().sqrt();
    }
    for j in 0..d_out {
        ws.g[j] = m[j] / ws.n[j].max(NORM_EPS as f32);
    }
    // base_result = x·W0ᵀ; lora_result = lora_B(lora_A(x)).
    sgemm(t, d_in, d_out, 1.0, &x, false, &w, true, 0.0, &mut ws.base)?;
    sgemm(t, d_in, r, 1.0, &x, false, &a, true, 0.0, &mut ws.u)?;
    sgemm(t, r, d_out, 1.0, &ws.u, false, &b, true, 0.0, &mut ws.lora)?;
    // result_dora = (mag_norm_scale − 1)·base_result + mag_norm_scale·lora_result·scaling.
    for ti in 0..t {
        let row = ti * d_out..(ti + 1) * d_out;
        for ((tmp, (&bs, &lo)), &g) in ws.tmp[row.clone()]
            .iter_mut()
            .zip(ws.base[row.clone()].iter().zip(&ws.lora[row]))
            .zip(&ws.g)
        {
            *tmp = (g - 1.0) * bs + g * lo * s;
        }
    }
    // result = base_result + result_dora.
    for ((y, &bs), &d) in ws.y[..t * d_out]
        .iter_mut()
        .zip(&ws.base[..t * d_out])
        .zip(&ws.tmp[..t * d_out])
    {
        *y = bs + d;
    }
    Ok(())
}

/// The backward of [`unfused_forward`] as PyTorch's autograd runs it for PEFT's graph
/// (norm detached), after `unfused_forward` filled `ws`: separate elementwise passes for the
/// gradients of `base`, `lora` and `g`, then the products. Leaves `dx`, `dA`, `dB`, `dm` in
/// `ws` (f32).
///
/// # Errors
/// Inconsistent shapes.
pub fn unfused_backward(set: &InputSet, ws: &mut Workspace) -> Result<()> {
    let l = &set.layer;
    let (d_in, d_out, r) = l.dims()?;
    let t = set.x.shape()[0];
    let s = l.scaling as f32;
    let w = f32_of(&l.weight);
    let a = f32_of(&l.lora_a);
    let b = f32_of(&l.lora_b);
    let x = f32_of(&set.x);
    let dy = f32_of(&set.dy);
    let n = t * d_out;
    // Gradient of base_result: dy (from `result`) + (g − 1)·dy (from result_dora).
    for ti in 0..t {
        for j in 0..d_out {
            let k = ti * d_out + j;
            ws.tmp[k] = (ws.g[j] - 1.0) * dy[k];
        }
    }
    for (tmp, &d) in ws.tmp[..n].iter_mut().zip(&dy[..n]) {
        *tmp += d;
    }
    // Gradient of lora_result: g·s·dy.
    for ti in 0..t {
        for j in 0..d_out {
            let k = ti * d_out + j;
            ws.dlora[k] = ws.g[j] * dy[k] * s;
        }
    }
    // Gradient of mag_norm_scale: Σ_t dy ⊙ (base + s·lora), then through m / n (n detached).
    ws.dm.iter_mut().for_each(|v| *v = 0.0);
    for ti in 0..t {
        for j in 0..d_out {
            let k = ti * d_out + j;
            ws.dm[j] += dy[k] * (ws.base[k] + s * ws.lora[k]);
        }
    }
    for j in 0..d_out {
        ws.dm[j] /= ws.n[j].max(NORM_EPS as f32);
    }
    // dx = dbase·W0 + (dlora·B)·A; dB = dloraᵀ·U; dA = (dlora·B)ᵀ·x.
    sgemm(
        t, d_out, d_in, 1.0, &ws.tmp, false, &w, false, 0.0, &mut ws.dx,
    )?;
    sgemm(
        t, d_out, r, 1.0, &ws.dlora, false, &b, false, 0.0, &mut ws.du,
    )?;
    sgemm(t, r, d_in, 1.0, &ws.du, false, &a, false, 1.0, &mut ws.dx)?;
    sgemm(
        d_out, t, r, 1.0, &ws.dlora, true, &ws.u, false, 0.0, &mut ws.db,
    )?;
    sgemm(r, t, d_in, 1.0, &ws.du, true, &x, false, 0.0, &mut ws.da)?;
    Ok(())
}

/// Converts the unfused outputs to their dtypes (x's for y and dx, each parameter's for its
/// gradient), as a layer call returns them; part of the timed work.
///
/// # Errors
/// Inconsistent shapes.
pub fn unfused_outputs(
    set: &InputSet,
    ws: &Workspace,
    backward: bool,
) -> Result<(Tensor, Option<[Tensor; 4]>)> {
    let l = &set.layer;
    let (d_in, d_out, r) = l.dims()?;
    let t = set.x.shape()[0];
    let dt = set.x.dtype();
    let y = Tensor::from_f32(dt, vec![t, d_out], &ws.y[..t * d_out])?;
    if !backward {
        return Ok((y, None));
    }
    let m = l
        .magnitude
        .as_ref()
        .context("unfused DoRA needs a magnitude")?;
    Ok((
        y,
        Some([
            Tensor::from_f32(dt, vec![t, d_in], &ws.dx[..t * d_in])?,
            Tensor::from_f32(l.lora_a.dtype(), vec![r, d_in], &ws.da)?,
            Tensor::from_f32(l.lora_b.dtype(), vec![d_out, r], &ws.db)?,
            Tensor::from_f32(m.dtype(), vec![d_out], &ws.dm)?,
        ]),
    ))
}

/// Median over `reps` runs after one warm-up, for the ceilings (no rotation: the buffers are
/// far larger than any cache, or a GEMM whose reuse is the point).
fn ceiling_median(reps: usize, mut f: impl FnMut()) -> Result<Stats> {
    f();
    let mut v = Vec::with_capacity(reps);
    for _ in 0..reps {
        let t0 = std::time::Instant::now();
        f();
        v.push(t0.elapsed().as_secs_f64());
    }
    Stats::from_samples(&v)
}

/// The host's memory copy bandwidth in bytes/s, counting bytes read plus bytes written (as
/// the formulas count them): `bytes` copied between two buffers, split over every core, the
/// median of `reps` runs.
///
/// # Errors
/// A broken clock.
pub fn copy_bandwidth(bytes: usize, reps: usize) -> Result<f64> {
    let n = bytes / 4;
    // Non-zero data, first-touched before timing.
    let src: Vec<f32> = (0..n).map(|i| (i % 251) as f32 + 0.5).collect();
    let mut dst = vec![1f32; n];
    let threads = std::thread::available_parallelism().map_or(1, |c| c.get());
    let per = n.div_ceil(threads);
    let st = ceiling_median(reps, || {
        std::thread::scope(|sc| {
            for (d, s) in dst.chunks_mut(per).zip(src.chunks(per)) {
                sc.spawn(move || d.copy_from_slice(s));
            }
        });
        black_box(&mut dst);
    })?;
    Ok(2.0 * (n * 4) as f64 / st.median_s)
}

/// The GEMM crate's sgemm rate in FLOP/s on an `n × n × n` product (median of `reps`).
///
/// # Errors
/// A broken clock.
pub fn sgemm_rate(n: usize, reps: usize) -> Result<f64> {
    let mut rng = super::inputs::SplitMix::new(0x5eed);
    let a = rng.fill(n * n, 1.0);
    let b = rng.fill(n * n, 1.0);
    let mut c = vec![0f32; n * n];
    let mut err = Ok(());
    let st = ceiling_median(reps, || {
        if let Err(e) = sgemm(n, n, n, 1.0, &a, false, &b, false, 0.0, &mut c) {
            err = Err(e);
        }
        black_box(&mut c);
    })?;
    err?;
    Ok(2.0 * (n as f64).powi(3) / st.median_s)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dtype::DType;
    use crate::layer::Shape;

    /// f64 truth of DoRA forward and backward (norm detached), written out plainly here so
    /// the unfused baseline is checked without depending on any other path.
    /// `(y, dx, dA, dB, dm)` in f64.
    type Truth = (Vec<f64>, Vec<f64>, Vec<f64>, Vec<f64>, Vec<f64>);

    fn truth(set: &InputSet) -> Truth {
        let l = &set.layer;
        let (i_, o_, r_) = l.dims().unwrap();
        let t_ = set.x.shape()[0];
        let s = l.scaling;
        let (w, a, b) = (l.weight.to_f64(), l.lora_a.to_f64(), l.lora_b.to_f64());
        let m = l.magnitude.as_ref().unwrap().to_f64();
        let (x, dy) = (set.x.to_f64(), set.dy.to_f64());
        let mut g = vec![0.0; o_];
        let mut nrm = vec![0.0; o_];
        for j in 0..o_ {
            let mut acc = 0.0;
            for i in 0..i_ {
                let ba: f64 = (0..r_).map(|k| b[j * r_ + k] * a[k * i_ + i]).sum();
                let v = w[j * i_ + i] + s * ba;
                acc += v * v;
            }
            nrm[j] = acc.sqrt();
            g[j] = m[j] / nrm[j].max(NORM_EPS);
        }
        let mut u = vec![0.0; t_ * r_];
        for t in 0..t_ {
            for k in 0..r_ {
                u[t * r_ + k] = (0..i_).map(|i| x[t * i_ + i] * a[k * i_ + i]).sum();
            }
        }
        let mut z = vec![0.0; t_ * o_];
        let mut y = vec![0.0; t_ * o_];
        for t in 0..t_ {
            for j in 0..o_ {
                let base: f64 = (0..i_).map(|i| x[t * i_ + i] * w[j * i_ + i]).sum();
                let lo: f64 = (0..r_).map(|k| u[t * r_ + k] * b[j * r_ + k]).sum();
                z[t * o_ + j] = base + s * lo;
                y[t * o_ + j] = g[j] * z[t * o_ + j];
            }
        }
        let dz: Vec<f64> = (0..t_ * o_).map(|k| dy[k] * g[k % o_]).collect();
        let mut dzb = vec![0.0; t_ * r_];
        for t in 0..t_ {
            for k in 0..r_ {
                dzb[t * r_ + k] = (0..o_).map(|j| dz[t * o_ + j] * b[j * r_ + k]).sum();
            }
        }
        let mut dx = vec![0.0; t_ * i_];
        for t in 0..t_ {
            for i in 0..i_ {
                let base: f64 = (0..o_).map(|j| dz[t * o_ + j] * w[j * i_ + i]).sum();
                let lo: f64 = (0..r_).map(|k| dzb[t * r_ + k] * a[k * i_ + i]).sum();
                dx[t * i_ + i] = base + s * lo;
            }
        }
        let mut da = vec![0.0; r_ * i_];
        for k in 0..r_ {
            for i in 0..i_ {
                da[k * i_ + i] = s
                    * (0..t_)
                        .map(|t| dzb[t * r_ + k] * x[t * i_ + i])
                        .sum::<f64>();
            }
        }
        let mut db = vec![0.0; o_ * r_];
        let mut dm = vec![0.0; o_];
        for j in 0..o_ {
            for k in 0..r_ {
                db[j * r_ + k] = s * (0..t_).map(|t| dz[t * o_ + j] * u[t * r_ + k]).sum::<f64>();
            }
            dm[j] =
                (0..t_).map(|t| dy[t * o_ + j] * z[t * o_ + j]).sum::<f64>() / nrm[j].max(NORM_EPS);
        }
        (y, dx, da, db, dm)
    }

    #[test]
    fn unfused_matches_f64_truth() {
        // Sizes off every tile, in every dtype.
        for (dtype, tol) in [(DType::F32, 1e-5), (DType::F16, 2e-3), (DType::BF16, 1e-2)] {
            let shape = Shape {
                t: 7,
                d_in: 33,
                d_out: 19,
                r: 3,
            };
            let set = super::super::inputs::random_set(shape, dtype, 11).unwrap();
            let mut ws = Workspace::new(7, 33, 19, 3);
            unfused_forward(&set, &mut ws).unwrap();
            unfused_backward(&set, &mut ws).unwrap();
            let (y, g) = unfused_outputs(&set, &ws, true).unwrap();
            let [dx, da, db, dm] = g.unwrap();
            let (ty, tdx, tda, tdb, tdm) = truth(&set);
            for (name, got, want) in [
                ("y", y.to_f64(), ty),
                ("dx", dx.to_f64(), tdx),
                ("dA", da.to_f64(), tda),
                ("dB", db.to_f64(), tdb),
                ("dm", dm.to_f64(), tdm),
            ] {
                let e = crate::tensor::rel_l2(&got, &want);
                assert!(e < tol, "{name} {dtype}: rel-L2 {e:e} ≥ {tol:e}");
            }
        }
    }

    #[test]
    fn base_matches_truth_and_w0_pass_sums_squares() {
        let shape = Shape {
            t: 5,
            d_in: 31,
            d_out: 9,
            r: 2,
        };
        let set = super::super::inputs::random_set(shape, DType::F32, 3).unwrap();
        let mut ws = Workspace::new(5, 31, 9, 2);
        let (y, dx) = base_forward_backward(&set, &mut ws).unwrap();
        let (w, x, dy) = (set.layer.weight.to_f64(), set.x.to_f64(), set.dy.to_f64());
        let ty: Vec<f64> = (0..5 * 9)
            .map(|k| {
                (0..31)
                    .map(|i| x[(k / 9) * 31 + i] * w[(k % 9) * 31 + i])
                    .sum()
            })
            .collect();
        let tdx: Vec<f64> = (0..5 * 31)
            .map(|k| {
                (0..9)
                    .map(|j| dy[(k / 31) * 9 + j] * w[j * 31 + k % 31])
                    .sum()
            })
            .collect();
        assert!(crate::tensor::rel_l2(&y.to_f64(), &ty) < 1e-6);
        assert!(crate::tensor::rel_l2(&dx.to_f64(), &tdx) < 1e-6);
        let mut rows = vec![0f32; 9];
        w0_pass(&set, &mut rows).unwrap();
        for (j, &v) in rows.iter().enumerate() {
            let want: f64 = w[j * 31..(j + 1) * 31].iter().map(|v| v * v).sum();
            assert!((v as f64 - want).abs() < 1e-5 * want, "row {j}");
        }
    }

    #[test]
    fn sgemm_transposes_and_checks_lengths() {
        // A [2,3], B stored [2,3] used transposed: C = A·Bᵀ [2,2].
        let a = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0];
        let b = [1.0, 0.0, 1.0, 0.0, 1.0, 0.0];
        let mut c = [0f32; 4];
        sgemm(2, 3, 2, 1.0, &a, false, &b, true, 0.0, &mut c).unwrap();
        assert_eq!(c, [4.0, 2.0, 10.0, 5.0]);
        // Aᵀ with A stored [3,2]: op(A) = [[1,3,5],[2,4,6]].
        let mut c = [0f32; 4];
        sgemm(2, 3, 2, 1.0, &a, true, &b, true, 0.0, &mut c).unwrap();
        assert_eq!(c, [6.0, 3.0, 8.0, 4.0]);
        assert!(sgemm(2, 3, 2, 1.0, &a[..5], false, &b, true, 0.0, &mut c).is_err());
    }

    #[test]
    fn unfused_extra_counts_two_full_matrices() {
        let ws = Workspace::new(1, 100, 50, 4);
        assert!(ws.unfused_extra_bytes() >= 2 * 4 * 100 * 50);
    }
}
