//! Per-module statistics for `dorafuse inspect`, reported in f64: the size of the update and,
//! with a base model, the DoRA paper's Figure-2 quantities ΔM and ΔD (computed in f32 with
//! f64 sums for `[d_out, d_in]` weights, see [`crate::cpu::rows::RowLayer::figure2`]).

use super::apply::AdaptedModel;
use super::config::Init;
use super::model::{AdapterModule, ModuleKind};
use crate::cpu::rows::{Elems, RowLayer};
use crate::dtype::DType;
use crate::layer::{Layer, NORM_EPS};
use anyhow::{Context, Result};
use serde::Serialize;

/// What `inspect` reports for one module.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ModuleStats {
    /// Module name.
    pub module: String,
    /// Rank.
    pub rank: usize,
    /// Alpha.
    pub alpha: f64,
    /// Effective scaling s.
    pub scaling: f64,
    /// Storage dtype of the adapter tensors.
    pub dtype: String,
    /// The base layer as PEFT wraps it: `linear`, `conv1d` (transformers' Conv1D, weight
    /// `[in, out]`), `embedding` or `conv`; `None` for a linear module without a base (its
    /// layout is decided against the base weight).
    pub layer: Option<String>,
    /// Input features.
    pub d_in: usize,
    /// Output features.
    pub d_out: usize,
    /// ‖s·B·A‖_F, from s²·tr((BᵀB)(AAᵀ)) without forming B·A.
    pub sba_fro: f64,
    /// Smallest magnitude (DoRA only).
    pub magnitude_min: Option<f64>,
    /// Mean magnitude (DoRA only).
    pub magnitude_mean: Option<f64>,
    /// Largest magnitude (DoRA only).
    pub magnitude_max: Option<f64>,
    /// With a base: ΔM = mean_j |m_j − ‖W0_j‖| (for plain LoRA m_j is ‖W0_j + s·B_j·A‖).
    pub delta_m: Option<f64>,
    /// With a base: ΔD = mean_j (1 − cos(W0_j, W'_j)), W' the merged weight.
    pub delta_d: Option<f64>,
    /// With a base: ‖W0‖_F.
    pub w0_fro: Option<f64>,
}

/// ‖s·B·A‖_F = |s|·sqrt(tr((BᵀB)(AAᵀ))): two r×r Gram matrices, O((d_in + d_out)·r²).
pub fn sba_fro(m: &AdapterModule) -> f64 {
    let (d_in, d_out, r) = m.dims();
    let a = m.lora_a.to_f64();
    let b = m.lora_b.to_f64();
    use crate::cpu::gemm::{gemm_on_this_thread as gemm, View, ViewMut};
    // A·Aᵀ [r, r] and Bᵀ·B [r, r], f64 products on this thread (waking a pool's threads for
    // so few FLOPs costs more than the products, a wait for a core on a loaded machine).
    let mut aat = vec![0f64; r * r];
    let mut btb = vec![0f64; r * r];
    gemm(
        1.0,
        View::new(&a, r, d_in),
        View::new(&a, r, d_in).t(),
        0.0,
        ViewMut::new(&mut aat, r, r),
    );
    gemm(
        1.0,
        View::new(&b, d_out, r).t(),
        View::new(&b, d_out, r),
        0.0,
        ViewMut::new(&mut btb, r, r),
    );
    // tr(XY) = Σ_pq X_pq·Y_qp, and both are symmetric.
    let tr: f64 = aat.iter().zip(&btb).map(|(x, y)| x * y).sum();
    m.scaling.abs() * tr.max(0.0).sqrt()
}

/// The adapter-only statistics of a module.
pub fn module_stats(m: &AdapterModule) -> ModuleStats {
    let (d_in, d_out, _) = m.dims();
    let mag = m.magnitude.as_ref().map(|t| t.to_f64());
    let (mn, mean, mx) = match &mag {
        Some(v) if !v.is_empty() => (
            Some(v.iter().copied().fold(f64::INFINITY, f64::min)),
            Some(v.iter().sum::<f64>() / v.len() as f64),
            Some(v.iter().copied().fold(f64::NEG_INFINITY, f64::max)),
        ),
        _ => (None, None, None),
    };
    ModuleStats {
        module: m.name.clone(),
        rank: m.rank,
        alpha: m.alpha,
        scaling: m.scaling,
        dtype: m.dtype().name().to_string(),
        layer: match m.kind {
            super::model::ModuleKind::Linear => None,
            super::model::ModuleKind::Embedding => Some("embedding".into()),
            super::model::ModuleKind::Conv { .. } => Some("conv".into()),
        },
        d_in,
        d_out,
        sba_fro: sba_fro(m),
        magnitude_min: mn,
        magnitude_mean: mean,
        magnitude_max: mx,
        delta_m: None,
        delta_d: None,
        w0_fro: None,
    }
}

/// [`figure2`] of one module of an adapted model. A linear `[d_out, d_in]` module on a kept
/// base is read where its base weight lies (memory-mapped, in its stored dtype: no copy of
/// W0); every other module through [`AdaptedModel::layer`].
///
/// # Errors
/// As [`AdaptedModel::layer`]: an unknown module or an unreadable base tensor.
pub fn module_figure2(model: &AdaptedModel<'_>, module: &str) -> Result<(f64, f64, f64)> {
    let m = model
        .adapter
        .modules
        .get(module)
        .with_context(|| format!("{module}: not a module of this adapter"))?;
    if matches!(m.kind, ModuleKind::Linear)
        && model.init == Init::KeepsBase
        && !model.module_fan_in_fan_out(module)?
    {
        let name = model.weight_name(module);
        let e = model.base.entry(&name)?;
        let dtype = DType::from_safetensors(e.dtype).with_context(|| {
            format!("base tensor {name}: quantized or integer base weights are not supported")
        })?;
        model.base.prefetch(&name);
        let w = Elems::from_bytes(dtype, model.base.bytes(&name)?)?;
        let d_out = e.shape.first().copied().unwrap_or(0);
        let layer = RowLayer::from_parts(
            w,
            d_out,
            &m.lora_a,
            &m.lora_b,
            m.magnitude.as_ref(),
            m.scaling,
        )
        .with_context(|| format!("base weight {name} {:?}", e.shape))?;
        let f = layer.figure2();
        if [f.0, f.1, f.2].iter().all(|v| v.is_finite()) {
            return Ok(f);
        }
        // A non-finite figure has a non-finite input: name it.
        model
            .base
            .tensor(&name)?
            .check_finite(&format!("base weight {name}"))?;
    }
    figure2(&model.layer(module)?)
}

/// ΔM, ΔD and ‖W0‖_F of a layer: for a `[d_out, d_in]` weight
/// [`crate::cpu::rows::RowLayer::figure2`] (one pass on all cores, f32 with f64 sums); for a
/// `[d_in, d_out]` one in f64, one row of V = W0 + s·B·A at a time.
///
/// With g_j = m_j / max(‖V_j‖, ε) and W'_j = g_j·V_j: ΔM = mean_j |m_j − ‖W0_j‖| and
/// ΔD = mean_j (1 − cos(W0_j, W'_j)). For plain LoRA, m_j = ‖V_j‖ and W' = V. A row where
/// W0_j or W'_j is zero has no direction; it counts as cos = 1 (no change measured).
///
/// # Errors
/// Inconsistent layer shapes.
pub fn figure2(layer: &Layer) -> Result<(f64, f64, f64)> {
    let f = figure2_of(layer)?;
    if [f.0, f.1, f.2].iter().all(|v| v.is_finite()) {
        return Ok(f);
    }
    // A non-finite figure has a non-finite input: name it.
    layer.weight.check_finite("weight")?;
    layer.lora_a.check_finite("lora_A")?;
    layer.lora_b.check_finite("lora_B")?;
    if let Some(m) = &layer.magnitude {
        m.check_finite("magnitude")?;
    }
    anyhow::bail!("ΔM or ΔD is not finite (finite inputs: an overflow)")
}

/// [`figure2`] before its finiteness check.
fn figure2_of(layer: &Layer) -> Result<(f64, f64, f64)> {
    if !layer.fan_in_fan_out {
        // One pass on all cores in f32, V never formed.
        return crate::cpu::rows::figure2(layer);
    }
    let (d_in, d_out, r) = layer.dims()?;
    let w = layer.weight.to_f64();
    let a = layer.lora_a.to_f64();
    let b = layer.lora_b.to_f64();
    let m = layer.magnitude.as_ref().map(|t| t.to_f64());
    let s = layer.scaling;
    let (mut dm, mut dd, mut w0sq) = (0f64, 0f64, 0f64);
    let mut w0 = vec![0f64; d_in];
    let mut v = vec![0f64; d_in];
    for j in 0..d_out {
        for i in 0..d_in {
            w0[i] = if layer.fan_in_fan_out {
                w[i * d_out + j]
            } else {
                w[j * d_in + i]
            };
        }
        v.copy_from_slice(&w0);
        for k in 0..r {
            let c = s * b[j * r + k];
            for (vi, ai) in v.iter_mut().zip(&a[k * d_in..(k + 1) * d_in]) {
                *vi += c * ai;
            }
        }
        let w0n2: f64 = w0.iter().map(|x| x * x).sum();
        let vn = v.iter().map(|x| x * x).sum::<f64>().sqrt();
        let dot: f64 = w0.iter().zip(&v).map(|(x, y)| x * y).sum();
        let w0n = w0n2.sqrt();
        w0sq += w0n2;
        let (mj, gj) = match &m {
            Some(m) => (m[j], m[j] / vn.max(NORM_EPS)),
            None => (vn, 1.0),
        };
        dm += (mj - w0n).abs();
        let wn = gj.abs() * vn;
        let cos = if w0n > 0.0 && wn > 0.0 {
            gj * dot / (w0n * wn)
        } else {
            1.0
        };
        dd += 1.0 - cos;
    }
    Ok((dm / d_out as f64, dd / d_out as f64, w0sq.sqrt()))
}
