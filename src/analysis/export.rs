//! `dorafuse export-lora`: a DoRA adapter as a plain LoRA adapter, for engines that load only
//! LoRA. A DoRA layer computes `W' = diag(g)·(W0 + s·B·A)` with `g = m / ‖W0 + s·B·A‖`
//! (row-wise), so its full update over the base is
//!
//! ```text
//! ΔW = W' − W0 = diag(g − 1)·W0 + diag(g)·s·B·A        [d_out, d_in]
//! ```
//!
//! which is generally of full rank. Its best rank-k approximation `s'·B'·A'` (Eckart–Young)
//! is found by a randomized SVD ([`randomized_svd`]) whose products with ΔW read W0 from the
//! base's memory map one block of rows at a time ([`LayerMatrix`]); no `d_out × d_in` matrix
//! is held. The reported errors are computed exactly, in a last pass over W0, from the
//! factors as written (rounded to the adapter's dtype): the weight error
//! `‖ΔW − s'·B'·A'‖_F / ‖ΔW‖_F` and the layer output error `‖y_LoRA − y_DoRA‖ / ‖y_DoRA‖` on
//! random inputs. A plain LoRA input has g = 1 and is re-ranked the same way.

use super::lowrank::{
    choose_rank, randomized_svd, rank_for_energy, split_factors, LinearOp, RankTarget, Svd,
};
use super::stream::{LayerMatrix, StoredWeight};
use super::{factors, magnitude_scale, scale_rows, NewFactors};
use crate::adapter::{AdaptedModel, Adapter};
use crate::layer;
use anyhow::{Context, Result};
use serde::Serialize;
use std::collections::BTreeMap;

/// How the randomized SVD is run.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ExportOptions {
    /// The rank or energy to keep (energy: per module, of `‖ΔW‖_F²`).
    pub target: RankTarget,
    /// Extra sketch columns beyond the rank (Halko et al. recommend 5–10).
    pub oversample: usize,
    /// Subspace (power) iterations; each reads W0 twice.
    pub power_iters: usize,
}

impl Default for ExportOptions {
    fn default() -> Self {
        Self {
            target: RankTarget::Rank(16),
            oversample: 10,
            power_iters: 2,
        }
    }
}

/// What `export-lora` reports for one module.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ExportRow {
    /// Module name.
    pub module: String,
    /// d_out.
    pub d_out: usize,
    /// d_in.
    pub d_in: usize,
    /// The DoRA adapter's rank.
    pub rank_before: usize,
    /// The exported LoRA rank k.
    pub rank: usize,
    /// The new scaling s'.
    pub scaling: f64,
    /// The sketch size the randomized SVD used.
    pub sketch: usize,
    /// `‖ΔW‖_F` (exact).
    pub delta_w_fro: f64,
    /// `‖ΔW − s'·B'·A'‖_F / ‖ΔW‖_F` (exact, with the factors as written).
    pub weight_rel_err: f64,
    /// `‖x·(ΔW − s'·B'·A')ᵀ‖ / ‖x·W'ᵀ + b‖` on [`super::INPUT_TOKENS`] rows of standard
    /// normal x: the relative error of the layer output.
    pub output_rel_err: f64,
}

/// Exports every module of the adapter in `model` as plain LoRA. Returns the LoRA adapter and
/// one row per module.
///
/// # Errors
/// A rank above `min(d_out, d_in)` of some module (named), or a failure reading the base.
pub fn export_lora(
    model: &AdaptedModel<'_>,
    opts: ExportOptions,
) -> Result<(Adapter, Vec<ExportRow>)> {
    let adapter = model.adapter;
    super::check_keeps_base(adapter)?;
    let rslora = adapter.config.lora.use_rslora;
    // Check every requested rank before reading any base weight.
    if let RankTarget::Rank(k) = opts.target {
        for (name, m) in &adapter.modules {
            let (d_in, d_out, _) = m.dims();
            choose_rank(
                opts.target,
                &[],
                d_out.min(d_in),
                &format!("{name} ({d_out}×{d_in})"),
            )
            .map(|_| ())
            .with_context(|| format!("--rank {k}"))?;
        }
    }
    let mut new: BTreeMap<String, NewFactors> = BTreeMap::new();
    let mut rows = Vec::new();
    for (name, m) in &adapter.modules {
        let (d_in, d_out, r) = m.dims();
        let n = d_out.min(d_in);
        let w0 = StoredWeight::open(model, name)?;
        let (b, a) = factors(m);
        let sb = &b * faer::scale(m.scaling);
        let g = match &m.magnitude {
            None => vec![1.0; d_out],
            Some(mag) => {
                let v = LayerMatrix::new(&w0, vec![1.0; d_out], vec![(sb.clone(), a.clone())])?;
                magnitude_scale(&mag.to_f64(), &v.row_norms2()?)
            }
        };
        let gm1: Vec<f64> = g.iter().map(|x| x - 1.0).collect();
        let gsb = scale_rows(&sb, &g);
        let dw = LayerMatrix::new(&w0, gm1.clone(), vec![(gsb.clone(), a.clone())])?;
        let total = dw.frob2()?;
        let (svd, k, sketch) = sketch_for(&dw, opts, total, n, name)?;
        let s_new = layer::scaling(m.alpha, k, rslora).with_context(|| name.clone())?;
        let (b2, a2) = split_factors(&svd, k, s_new);
        let f = NewFactors::new(name, &b2, &a2, (d_in, d_out, k), s_new, m.dtype())?;
        // Exact errors with the factors as written.
        let (sb2, a2m) = f.scaled_f64();
        let neg = sb2 * faer::scale(-1.0);
        let resid = LayerMatrix::new(&w0, gm1, vec![(gsb.clone(), a.clone()), (neg, a2m)])?;
        let err2 = resid.frob2()?;
        let x = super::lowrank::gaussian(d_in, super::INPUT_TOKENS, super::INPUT_SEED);
        let merged = LayerMatrix::new(&w0, g.clone(), vec![(gsb, a.clone())])?;
        let mut y = merged.mul(x.as_ref())?;
        if let Some(bias) = super::base_bias(model, name)? {
            for t in 0..y.ncols() {
                for (j, bj) in bias.iter().enumerate() {
                    y.write(j, t, y.read(j, t) + bj);
                }
            }
        }
        let dy = resid.mul(x.as_ref())?;
        rows.push(ExportRow {
            module: name.clone(),
            d_out,
            d_in,
            rank_before: r,
            rank: k,
            scaling: s_new,
            sketch,
            delta_w_fro: total.sqrt(),
            weight_rel_err: super::rel_norm(err2.sqrt(), total.sqrt()),
            output_rel_err: super::rel_norm(dy.norm_l2(), y.norm_l2()),
        });
        new.insert(name.clone(), f);
    }
    let out = super::rebuild(adapter, &new, false)?;
    Ok((out, rows))
}

/// Runs the randomized SVD with a sketch large enough for the target; returns it, the rank
/// and the sketch size. For an energy target the sketch doubles (from 2·(r + oversample))
/// until its leading singular values hold the energy of the exact `‖ΔW‖_F²` with
/// `oversample` columns to spare, or it covers the whole matrix (then exact).
fn sketch_for(
    dw: &LayerMatrix<'_, '_>,
    opts: ExportOptions,
    total: f64,
    n: usize,
    name: &str,
) -> Result<(Svd, usize, usize)> {
    match opts.target {
        RankTarget::Rank(k) => {
            let l = (k + opts.oversample).min(n);
            let svd = randomized_svd(dw, l, opts.power_iters, super::SKETCH_SEED)
                .with_context(|| name.to_string())?;
            Ok((svd, k, l))
        }
        RankTarget::Energy(e) => {
            let mut l = (2 * (dw_rank_hint(dw) + opts.oversample)).min(n);
            loop {
                let svd = randomized_svd(dw, l, opts.power_iters, super::SKETCH_SEED)
                    .with_context(|| name.to_string())?;
                match rank_for_energy(&svd.sigma, total, e) {
                    Some(k) if k + opts.oversample <= l || l == n => return Ok((svd, k, l)),
                    None if l == n => return Ok((svd, n, l)),
                    _ => l = (2 * l).min(n),
                }
            }
        }
    }
}

/// The rank of the low-rank terms of a layer matrix (a starting sketch size).
fn dw_rank_hint(dw: &LayerMatrix<'_, '_>) -> usize {
    dw.term_rank()
}
