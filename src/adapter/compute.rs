//! The one place where the adapter code asks for arithmetic on a layer: the DoRA scale g
//! and the merged weight W' = diag(g)·(W0 + s·B·A), on the CPU path or on a GPU.

use crate::layer::{Layer, NORM_EPS};
use anyhow::{ensure, Result};

/// Where `merge` computes W'.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum MergeDevice {
    /// The CPU path (f32 with f32 accumulation).
    #[default]
    Cpu,
    /// The CUDA kernels on GPU 0.
    Cuda,
}

impl MergeDevice {
    /// True when `Cuda` would work here: a driver, a device and compiled kernels.
    pub fn cuda_usable() -> bool {
        // The GPU merge is not wired in this build (see `merged_weight`).
        false
    }
}

/// V = W0 + s·B·A as `[d_out, d_in]` f32 (W0 transposed first when stored `[d_in, d_out]`).
fn v_matrix(layer: &Layer) -> Result<(Vec<f32>, usize, usize)> {
    let (d_in, d_out, r) = layer.dims()?;
    let w = layer.weight.to_f32();
    let mut v = if layer.fan_in_fan_out {
        let mut t = vec![0f32; d_out * d_in];
        for i in 0..d_in {
            for j in 0..d_out {
                t[j * d_in + i] = w[i * d_out + j];
            }
        }
        t
    } else {
        w
    };
    let a = layer.lora_a.to_f32();
    let b = layer.lora_b.to_f32();
    // SAFETY: a is r×d_in, b is d_out×r, v is d_out×d_in, all row-major and contiguous with
    // exactly those lengths (checked by Layer::dims and the tensors' own invariants); the
    // strides below describe exactly those layouts.
    unsafe {
        matrixmultiply::sgemm(
            d_out,
            r,
            d_in,
            layer.scaling as f32,
            b.as_ptr(),
            r as isize,
            1,
            a.as_ptr(),
            d_in as isize,
            1,
            1.0,
            v.as_mut_ptr(),
            d_in as isize,
            1,
        );
    }
    Ok((v, d_out, d_in))
}

fn scale_from_v(layer: &Layer, v: &[f32], d_out: usize, d_in: usize) -> Option<Vec<f32>> {
    let m = layer.magnitude.as_ref()?.to_f32();
    Some(
        (0..d_out)
            .map(|j| {
                let row = &v[j * d_in..(j + 1) * d_in];
                let n = row.iter().map(|&x| x * x).sum::<f32>().sqrt();
                m[j] / n.max(NORM_EPS as f32)
            })
            .collect(),
    )
}

/// g = m / max(‖W0 + s·B·A‖, ε) per output row, f32; `None` for plain LoRA.
///
/// # Errors
/// Inconsistent layer shapes.
pub fn magnitude_scale(layer: &Layer) -> Result<Option<Vec<f32>>> {
    if layer.magnitude.is_none() {
        layer.dims()?;
        return Ok(None);
    }
    let (v, d_out, d_in) = v_matrix(layer)?;
    Ok(scale_from_v(layer, &v, d_out, d_in))
}

/// W' = diag(g)·(W0 + s·B·A) as `[d_out, d_in]` row-major f32 (g = 1 for plain LoRA),
/// with the g used.
///
/// # Errors
/// Inconsistent layer shapes; on `Cuda`, no usable GPU.
pub fn merged_weight(layer: &Layer, device: MergeDevice) -> Result<(Vec<f32>, Option<Vec<f32>>)> {
    ensure!(
        device == MergeDevice::Cpu,
        "merging on the GPU is not available in this build (the CUDA merged_weight kernel is not wired yet); use --device cpu"
    );
    let (mut v, d_out, d_in) = v_matrix(layer)?;
    let g = scale_from_v(layer, &v, d_out, d_in);
    if let Some(g) = &g {
        for (row, &gj) in v.chunks_exact_mut(d_in).zip(g) {
            row.iter_mut().for_each(|x| *x *= gj);
        }
    }
    Ok((v, g))
}

/// Undoes a merge: W0 = W'/g − s·B·A (W0 = W' − s·B·A for plain LoRA), `[d_out, d_in]`
/// f32, from the merged weight `[d_out, d_in]` (f32 values), the adapter factors and the g
/// that the merge used (recomputing g from W' would give a different value).
///
/// A zero g (a zero magnitude) loses the row; it comes back as −s·B_j·A.
///
/// # Errors
/// Lengths that disagree with the layer's shapes.
pub fn unmerge_weight(merged: &[f32], layer: &Layer, g: Option<&[f32]>) -> Result<Vec<f32>> {
    let (d_in, d_out, r) = layer.dims()?;
    ensure!(
        merged.len() == d_out * d_in,
        "merged weight has {} elements, expected {d_out}×{d_in}",
        merged.len()
    );
    let mut w: Vec<f32> = merged.to_vec();
    if let Some(g) = g {
        ensure!(
            g.len() == d_out,
            "g has {} elements, expected {d_out}",
            g.len()
        );
        for (row, &gj) in w.chunks_exact_mut(d_in).zip(g) {
            let inv = if gj != 0.0 { 1.0 / gj } else { 0.0 };
            row.iter_mut().for_each(|x| *x *= inv);
        }
    }
    let a = layer.lora_a.to_f32();
    let b = layer.lora_b.to_f32();
    // SAFETY: as in v_matrix: b d_out×r, a r×d_in, w d_out×d_in, contiguous row-major.
    unsafe {
        matrixmultiply::sgemm(
            d_out,
            r,
            d_in,
            -(layer.scaling as f32),
            b.as_ptr(),
            r as isize,
            1,
            a.as_ptr(),
            d_in as isize,
            1,
            1.0,
            w.as_mut_ptr(),
            d_in as isize,
            1,
        );
    }
    Ok(w)
}
