//! `dorafuse resize`: each module's update `s·B·A` truncated by SVD, computed from B and A
//! alone ([`update_svd`]: QR of B and of Aᵀ, SVD of the r × r core). The kept directions are
//! the best rank-k approximation of the update in the Frobenius norm (Eckart–Young), so the
//! dropped part is exactly `1 − energy kept` of `‖s·B·A‖_F²`. A DoRA adapter keeps its
//! magnitude vector m; its scale `g = m / ‖W0 + s·B·A‖` changes with the update, which is
//! reported when the base model is given.

use super::lowrank::{self, choose_rank, energy_kept, split_factors, update_svd, RankTarget, Svd};
use super::stream::{LayerMatrix, StoredWeight};
use super::{factors, magnitude_scale, scale_rows, NewFactors};
use crate::adapter::{AdaptedModel, Adapter};
use crate::layer;
use anyhow::{ensure, Context, Result};
use serde::Serialize;
use std::collections::BTreeMap;

/// What `resize` does.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ResizeOptions {
    /// The rank or energy to keep. `Rank(R)` keeps `min(R, r)` in a module of rank r and is
    /// refused above both r and `min(d_out, d_in)`.
    pub target: RankTarget,
    /// With an energy target: each module its own rank. Without: one rank for every module,
    /// the largest any module needs (capped at each module's own rank).
    pub per_module: bool,
}

/// What `resize` reports for one module.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ResizeRow {
    /// Module name.
    pub module: String,
    /// d_out.
    pub d_out: usize,
    /// d_in.
    pub d_in: usize,
    /// The rank before.
    pub rank_before: usize,
    /// The kept rank k.
    pub rank: usize,
    /// The new scaling s'.
    pub scaling: f64,
    /// Singular values of `s·B·A`, non-increasing (min(d_out, d_in, r) of them).
    pub singular_values: Vec<f64>,
    /// `Σ_{i<k} σ_i² / Σ σ_i²`: the fraction of `‖s·B·A‖_F²` kept.
    pub energy_kept: f64,
    /// `‖s'·B'·A' − s·B·A‖_F / ‖s·B·A‖_F` with the factors as written (rounded to the
    /// adapter's dtype).
    pub update_rel_err: f64,
    /// `‖y' − y‖ / ‖y‖` on [`super::INPUT_TOKENS`] rows of standard normal x: the whole
    /// layer (`y = x·W'ᵀ + b`) with a base model; the update alone (`x·(s·B·A)ᵀ`) without.
    pub output_rel_change: f64,
    /// `"layer"` or `"update"`: which output `output_rel_change` measures.
    pub output_scope: &'static str,
    /// DoRA with a base: `max_j |g'_j − g_j| / |g_j|`, the change of the magnitude scale.
    pub g_max_rel_change: Option<f64>,
}

/// One module's SVD and chosen rank.
struct Plan {
    svd: Svd,
    rank: usize,
}

/// Resizes every module of `adapter`; with `model` (the adapter paired with its base), the
/// layer output and DoRA's g are compared too. Returns the new adapter and one row per module.
///
/// # Errors
/// A rank above some module's rank (named), or a failure reading the base.
pub fn resize(
    adapter: &Adapter,
    model: Option<&AdaptedModel<'_>>,
    opts: ResizeOptions,
) -> Result<(Adapter, Vec<ResizeRow>)> {
    super::check_keeps_base(adapter)?;
    let rslora = adapter.config.lora.use_rslora;
    let mut plans: BTreeMap<String, Plan> = BTreeMap::new();
    for (name, m) in &adapter.modules {
        let (d_in, d_out, r) = m.dims();
        let svd = update_svd(
            &m.lora_b.to_f64(),
            &m.lora_a.to_f64(),
            d_out,
            d_in,
            r,
            m.scaling,
        );
        let what = format!("{name} (rank {r}, {d_out}×{d_in})");
        // A fixed rank is "at most R": a module of rank ≤ R is kept whole. Above both the
        // module's rank and min(d_out, d_in) no SVD has that many directions: refused.
        let rank = choose_rank(opts.target, &svd.sigma, r.max(d_out.min(d_in)), &what)?.min(r);
        plans.insert(name.clone(), Plan { svd, rank });
    }
    if matches!(opts.target, RankTarget::Energy(_)) && !opts.per_module {
        let k = plans.values().map(|p| p.rank).max().unwrap_or(1);
        for (name, p) in plans.iter_mut() {
            p.rank = k.min(adapter.modules[name].rank);
        }
    }
    let mut new: BTreeMap<String, NewFactors> = BTreeMap::new();
    for (name, p) in &plans {
        let m = &adapter.modules[name];
        let (d_in, d_out, _) = m.dims();
        let s_new = layer::scaling(m.alpha, p.rank, rslora).with_context(|| name.clone())?;
        let (b, a) = split_factors(&p.svd, p.rank, s_new);
        let f = NewFactors::new(name, &b, &a, (d_in, d_out, p.rank), s_new, m.dtype())?;
        new.insert(name.clone(), f);
    }
    let out = super::rebuild(adapter, &new, adapter.is_dora())?;
    let mut rows = Vec::new();
    for (name, p) in &plans {
        let m = &adapter.modules[name];
        let f = &new[name];
        let (d_in, d_out, r) = m.dims();
        let (b, a) = factors(m);
        let sb = &b * faer::scale(m.scaling);
        let (sb2, a2) = f.scaled_f64();
        // ‖s'B'A' − sBA‖ = ‖[s'B', −sB]·[A'; A]‖ from two QRs.
        let k = f.rank;
        let mut p_cat = vec![0f64; d_out * (k + r)];
        let mut q_cat = vec![0f64; (k + r) * d_in];
        for j in 0..d_out {
            for c in 0..k {
                p_cat[j * (k + r) + c] = sb2.read(j, c);
            }
            for c in 0..r {
                p_cat[j * (k + r) + k + c] = -sb.read(j, c);
            }
        }
        for c in 0..k {
            for i in 0..d_in {
                q_cat[c * d_in + i] = a2.read(c, i);
            }
        }
        for c in 0..r {
            for i in 0..d_in {
                q_cat[(k + c) * d_in + i] = a.read(c, i);
            }
        }
        let diff = lowrank::product_fro(&p_cat, &q_cat, d_out, d_in, k + r);
        let total = p.svd.sigma.iter().map(|x| x * x).sum::<f64>().sqrt();
        let update_rel_err = if total > 0.0 { diff / total } else { diff };
        let x = lowrank::gaussian(d_in, super::INPUT_TOKENS, super::INPUT_SEED);
        let (output_rel_change, output_scope, g_change) = match model {
            None => {
                // x·(s·B·A)ᵀ as (s·B)·(A·xᵀ), [d_out, T].
                let y = &sb * (&a * &x);
                let y2 = &sb2 * (&a2 * &x);
                (super::rel_change(&y2, &y), "update", None)
            }
            Some(model) => {
                let w0 = StoredWeight::open(model, name)?;
                let (g, g2) = match &m.magnitude {
                    None => (vec![1.0; d_out], vec![1.0; d_out]),
                    Some(mag) => {
                        let mag = mag.to_f64();
                        let v =
                            LayerMatrix::new(&w0, vec![1.0; d_out], vec![(sb.clone(), a.clone())])?;
                        let v2 = LayerMatrix::new(
                            &w0,
                            vec![1.0; d_out],
                            vec![(sb2.clone(), a2.clone())],
                        )?;
                        (
                            magnitude_scale(&mag, &v.row_norms2()?),
                            magnitude_scale(&mag, &v2.row_norms2()?),
                        )
                    }
                };
                let old = LayerMatrix::new(&w0, g.clone(), vec![(scale_rows(&sb, &g), a.clone())])?;
                let neg: Vec<f64> = g.iter().map(|x| -x).collect();
                let alpha: Vec<f64> = g2.iter().zip(&g).map(|(n, o)| n - o).collect();
                let diff_op = LayerMatrix::new(
                    &w0,
                    alpha,
                    vec![
                        (scale_rows(&sb2, &g2), a2.clone()),
                        (scale_rows(&sb, &neg), a.clone()),
                    ],
                )?;
                use lowrank::LinearOp;
                let mut y = old.mul(x.as_ref())?;
                if let Some(bias) = super::base_bias(model, name)? {
                    for t in 0..y.ncols() {
                        for (j, bj) in bias.iter().enumerate() {
                            y.write(j, t, y.read(j, t) + bj);
                        }
                    }
                }
                let dy = diff_op.mul(x.as_ref())?;
                let rel = super::rel_norm(dy.norm_l2(), y.norm_l2());
                let gch = m.magnitude.as_ref().map(|_| {
                    g.iter()
                        .zip(&g2)
                        .filter(|(o, _)| **o != 0.0)
                        .map(|(o, n)| ((n - o) / o).abs())
                        .fold(0.0, f64::max)
                });
                (rel, "layer", gch)
            }
        };
        ensure!(
            update_rel_err.is_finite(),
            "{name}: non-finite update error"
        );
        rows.push(ResizeRow {
            module: name.clone(),
            d_out,
            d_in,
            rank_before: r,
            rank: k,
            scaling: f.scaling,
            singular_values: p.svd.sigma.clone(),
            energy_kept: energy_kept(&p.svd.sigma, k),
            update_rel_err,
            output_rel_change,
            output_scope,
            g_max_rel_change: g_change,
        });
    }
    Ok((out, rows))
}
