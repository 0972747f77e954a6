//! The residual base of adapters whose initialisation rewrote W0 (`init_lora_weights`
//! "pissa" and "olora"), re-derived from the original base exactly as PEFT does when it loads
//! such an adapter onto it (`peft/tuners/lora/layer.py`, `pissa_init` and `olora_init`, run by
//! `update_layer` before the saved A, B and magnitude are loaded over the initial ones).
//!
//! - PiSSA: with W0 = U·S·Vᵀ on the rows `[d_out, d_in]`, A0 = √(S_r/s)·V_rᵀ and
//!   B0 = U_r·√(S_r/s), so s·B0·A0 = U_r·S_r·V_rᵀ, the top-r part of the SVD, whatever signs
//!   the SVD picks. It is unique when σ_r > σ_{r+1}; a tie (within 1e-6·σ_1) leaves PEFT's
//!   own result to its SVD's arbitrary choice, and is refused.
//! - OLoRA: with W0 = Q·R (the weight as stored), A0 = R_r and B0 = Q_r, so
//!   s·B0·A0 = s·Q_r·Q_rᵀ·W0, s times the projection of W0 onto its first r columns, unique
//!   when those columns are independent (refused otherwise).
//!
//! W_res = W0 − s·B0·A0 is computed in f64 and rounded to f32 and then to the base dtype (PEFT
//! works in f32 and casts back).

use super::apply::Residual;
use super::config::Init;
use super::model::AdapterModule;
use crate::tensor::Tensor;
use anyhow::{bail, ensure, Result};

/// Relative gap below which σ_r and σ_{r+1} count as tied.
const SVD_TIE: f64 = 1e-6;

/// The residual base of one linear module: W_res in `weight`'s stored layout and dtype, and the
/// part taken out (P·Q on the rows).
///
/// # Errors
/// A rank larger than the weight allows, a tie at σ_r (PiSSA), dependent leading columns
/// (OLoRA), or `init` not rewriting the base.
pub fn residual_base(
    weight: &Tensor,
    fan_in_fan_out: bool,
    m: &AdapterModule,
    init: Init,
) -> Result<(Tensor, Residual)> {
    let (d_in, d_out, r) = m.dims();
    let stored = weight.to_f64();
    ensure!(
        stored.len() == d_in * d_out,
        "base weight has {} elements, expected {d_out}×{d_in}",
        stored.len()
    );
    ensure!(
        r <= d_in.min(d_out),
        "rank {r} exceeds min(d_out, d_in) = {}",
        d_in.min(d_out)
    );
    let rows = if fan_in_fan_out {
        transpose(&stored, d_in, d_out)
    } else {
        stored
    };
    let (p, q) = match init {
        Init::Pissa => pissa(&rows, d_out, d_in, r)?,
        Init::Olora => {
            ensure!(!fan_in_fan_out, "OLoRA on a Conv1D weight is not supported");
            olora(&rows, d_out, d_in, r, m.scaling)?
        }
        Init::KeepsBase => bail!("this initialisation keeps the base"),
    };
    let mut res = rows;
    for j in 0..d_out {
        for k in 0..r {
            let pj = p[j * r + k];
            if pj == 0.0 {
                continue;
            }
            for (x, qk) in res[j * d_in..(j + 1) * d_in]
                .iter_mut()
                .zip(&q[k * d_in..(k + 1) * d_in])
            {
                *x -= pj * qk;
            }
        }
    }
    let out = if fan_in_fan_out {
        transpose(&res, d_out, d_in)
    } else {
        res
    };
    let f32s: Vec<f32> = out.iter().map(|&x| x as f32).collect();
    let t = Tensor::from_f32(weight.dtype(), weight.shape().to_vec(), &f32s)?;
    Ok((t, Residual { p, q, r }))
}

/// `[rows, cols]` → `[cols, rows]`.
fn transpose(v: &[f64], rows: usize, cols: usize) -> Vec<f64> {
    let mut t = vec![0f64; v.len()];
    for i in 0..rows {
        for j in 0..cols {
            t[j * rows + i] = v[i * cols + j];
        }
    }
    t
}

/// PiSSA's s·B0·A0 = U_r·S_r·V_rᵀ as P = U_r·S_r `[d_out, r]`, Q = V_rᵀ `[r, d_in]`.
fn pissa(w: &[f64], d_out: usize, d_in: usize, r: usize) -> Result<(Vec<f64>, Vec<f64>)> {
    let mat = faer::Mat::<f64>::from_fn(d_out, d_in, |i, j| w[i * d_in + j]);
    let svd = mat.thin_svd();
    let (u, s, v) = (svd.u(), svd.s_diagonal(), svd.v());
    let k = s.nrows();
    let mut order: Vec<usize> = (0..k).collect();
    order.sort_by(|&a, &b| s.read(b).total_cmp(&s.read(a)));
    let sigma = |i: usize| s.read(order[i]);
    if r < k {
        let gap = sigma(r - 1) - sigma(r);
        if gap <= SVD_TIE * sigma(0) {
            bail!(
                "singular values {r} and {} of W0 are tied ({:e} and {:e}), so the top-{r} part PiSSA removed is not unique (PEFT's own SVD picks one arbitrarily)",
                r + 1,
                sigma(r - 1),
                sigma(r)
            );
        }
    }
    let mut p = vec![0f64; d_out * r];
    let mut q = vec![0f64; r * d_in];
    for (c, &o) in order.iter().take(r).enumerate() {
        let sv = s.read(o);
        for i in 0..d_out {
            p[i * r + c] = u.read(i, o) * sv;
        }
        for j in 0..d_in {
            q[c * d_in + j] = v.read(j, o);
        }
    }
    Ok((p, q))
}

/// OLoRA's s·Q_r·R_r = s·Q_r·(Q_rᵀ·W0) as P = s·Q_r `[d_out, r]`, Q = Q_rᵀ·W0 `[r, d_in]`;
/// Q_r from the first r columns of W0 by Gram-Schmidt, orthogonalised twice (the same span as
/// PEFT's Householder QR, so the same projection).
fn olora(
    w: &[f64],
    d_out: usize,
    d_in: usize,
    r: usize,
    scaling: f64,
) -> Result<(Vec<f64>, Vec<f64>)> {
    // Columns of Q_r, each of length d_out.
    let mut cols: Vec<Vec<f64>> = Vec::with_capacity(r);
    for c in 0..r {
        let orig: Vec<f64> = (0..d_out).map(|i| w[i * d_in + c]).collect();
        let n0 = orig.iter().map(|x| x * x).sum::<f64>().sqrt();
        let mut v = orig;
        for _ in 0..2 {
            for qc in &cols {
                let d: f64 = qc.iter().zip(&v).map(|(a, b)| a * b).sum();
                v.iter_mut().zip(qc).for_each(|(x, y)| *x -= d * y);
            }
        }
        let n = v.iter().map(|x| x * x).sum::<f64>().sqrt();
        // NaN counts as dependent too.
        if n.is_nan() || n <= 1e-10 * n0.max(f64::MIN_POSITIVE) {
            bail!("column {c} of W0 depends on the columns before it, so the rank-{r} QR factor OLoRA removed is not unique");
        }
        v.iter_mut().for_each(|x| *x /= n);
        cols.push(v);
    }
    let mut p = vec![0f64; d_out * r];
    let mut q = vec![0f64; r * d_in];
    for (c, qc) in cols.iter().enumerate() {
        for i in 0..d_out {
            p[i * r + c] = scaling * qc[i];
        }
        for j in 0..d_in {
            q[c * d_in + j] = (0..d_out).map(|i| qc[i] * w[i * d_in + j]).sum();
        }
    }
    Ok((p, q))
}
