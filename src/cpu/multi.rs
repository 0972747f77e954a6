//! The CPU path of the multi-adapter layer (docs/design.md §2b): every token on its own
//! adapter, or none (index −1),
//!
//! ```text
//! y_t = g_k ⊙ (x_t·W0ᵀ + s_k·(x_t·A_kᵀ)·B_kᵀ) + b     g_k = m_k / max(n_k, ε), 1 for LoRA
//! ```
//!
//! One base product over all tokens, then one group per adapter (its tokens gathered, the
//! shrink and expand as two products), in f32 with products through `matrixmultiply`; y is
//! rounded once to x's dtype. g is computed once per adapter by the CPU norm
//! ([`super::magnitude_scale`], never building `W0 + s·B·A`) and can be kept and reused
//! ([`magnitude_scales`], [`forward_on_base`]), as a serving engine computes it at adapter load.

use super::gemm::{gemm, View, ViewMut};
use crate::case_multi::MultiLayer;
use crate::tensor::Tensor;
use anyhow::{ensure, Result};

/// g per adapter (`Some(g [d_out])` for DoRA, `None` for plain LoRA), each by the CPU norm.
///
/// # Errors
/// An invalid layer, naming the tensor.
pub fn magnitude_scales(layer: &MultiLayer) -> Result<Vec<Option<Vec<f32>>>> {
    layer.dims()?;
    (0..layer.adapters.len())
        .map(|k| {
            if layer.adapters[k].is_dora() {
                super::magnitude_scale(&layer.adapter_layer(k))
            } else {
                Ok(None)
            }
        })
        .collect()
}

/// `y [T, d_out]` in x's dtype for `x [T, d_in]` with `adapter_index [T]` (−1 = base only).
///
/// # Errors
/// An invalid layer, `x` or index (naming the tensor, or the token of an out-of-range index).
pub fn forward(layer: &MultiLayer, x: &Tensor, adapter_index: &[i32]) -> Result<Tensor> {
    let (t, d_in, d_out) = layer.check_call(x, adapter_index)?;
    let xw = x.to_f32();
    let w0: Vec<f32> = layer.weight.to_f32();
    let w0v = if layer.fan_in_fan_out {
        View::new(&w0, d_in, d_out)
    } else {
        View::new(&w0, d_out, d_in).t()
    };
    let mut base = vec![0.0f32; t * d_out];
    gemm(
        1.0,
        View::new(&xw, t, d_in),
        w0v,
        0.0,
        ViewMut::new(&mut base, t, d_out),
    );
    let scales = magnitude_scales(layer)?;
    let y = finish(layer, &xw, adapter_index, &base, &scales, (t, d_in, d_out))?;
    Tensor::from_f32(x.dtype(), vec![t, d_out], &y)
}

/// The multi-adapter layer over a base output the caller computed (`base [T, d_out]`, e.g.
/// one slice of a fused QKV product, as f32 values), with g per adapter from
/// [`magnitude_scales`]: `y` in x's dtype.
///
/// # Errors
/// An invalid layer, `x`, index, base length or scales (one per adapter, `Some` exactly for
/// DoRA, d_out long).
pub fn forward_on_base(
    layer: &MultiLayer,
    x: &Tensor,
    adapter_index: &[i32],
    base: &[f32],
    scales: &[Option<Vec<f32>>],
) -> Result<Tensor> {
    let (t, d_in, d_out) = layer.check_call(x, adapter_index)?;
    ensure!(
        base.len() == t * d_out,
        "base has {} values, expected T·d_out = {}",
        base.len(),
        t * d_out
    );
    let y = finish(
        layer,
        &x.to_f32(),
        adapter_index,
        base,
        scales,
        (t, d_in, d_out),
    )?;
    Tensor::from_f32(x.dtype(), vec![t, d_out], &y)
}

/// y = g_k ⊙ (base + s_k·(x·A_kᵀ)·B_kᵀ) + b per adapter group, base + b for −1, as f32.
fn finish(
    layer: &MultiLayer,
    x: &[f32],
    index: &[i32],
    base: &[f32],
    scales: &[Option<Vec<f32>>],
    (t, d_in, d_out): (usize, usize, usize),
) -> Result<Vec<f32>> {
    ensure!(
        scales.len() == layer.adapters.len(),
        "{} scales for {} adapters",
        scales.len(),
        layer.adapters.len()
    );
    let bias = layer.bias.as_ref().map(Tensor::to_f32);
    let mut y = base[..t * d_out].to_vec();
    for (k, a) in layer.adapters.iter().enumerate() {
        let rows: Vec<usize> = (0..t).filter(|&i| index[i] == k as i32).collect();
        let g = scales[k].as_deref();
        ensure!(
            g.is_some() == a.is_dora() && g.map_or(true, |g| g.len() == d_out),
            "scale of adapter {k}: expected {}",
            if a.is_dora() {
                format!("g of {d_out} values (DoRA)")
            } else {
                "none (plain LoRA)".to_string()
            }
        );
        if rows.is_empty() {
            continue;
        }
        let (n, r) = (rows.len(), a.rank());
        let xg: Vec<f32> = rows
            .iter()
            .flat_map(|&i| x[i * d_in..(i + 1) * d_in].iter().copied())
            .collect();
        let (av, bv) = (a.lora_a.to_f32(), a.lora_b.to_f32());
        let mut u = vec![0.0f32; n * r];
        gemm(
            1.0,
            View::new(&xg, n, d_in),
            View::new(&av, r, d_in).t(),
            0.0,
            ViewMut::new(&mut u, n, r),
        );
        let mut z: Vec<f32> = rows
            .iter()
            .flat_map(|&i| base[i * d_out..(i + 1) * d_out].iter().copied())
            .collect();
        gemm(
            a.scaling as f32,
            View::new(&u, n, r),
            View::new(&bv, d_out, r).t(),
            1.0,
            ViewMut::new(&mut z, n, d_out),
        );
        for (&i, zr) in rows.iter().zip(z.chunks_exact(d_out)) {
            let yr = &mut y[i * d_out..(i + 1) * d_out];
            match g {
                Some(g) => yr
                    .iter_mut()
                    .zip(zr.iter().zip(g))
                    .for_each(|(y, (z, g))| *y = g * z),
                None => yr.copy_from_slice(zr),
            }
        }
    }
    if let Some(b) = &bias {
        for row in y.chunks_exact_mut(d_out) {
            row.iter_mut().zip(b).for_each(|(v, b)| *v += b);
        }
    }
    Ok(y)
}
