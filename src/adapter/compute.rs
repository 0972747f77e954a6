//! The one place where the adapter code asks for arithmetic on a layer: the DoRA scale g
//! and the merged weight W' = diag(g)·(W0 + s·B·A), on the CPU path or on a GPU.

use crate::layer::Layer;
use crate::tensor::Tensor;
use anyhow::{bail, ensure, Result};

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
    /// True when `Cuda` would work here: a CUDA driver with a device, and kernels compiled
    /// into this build.
    pub fn cuda_usable() -> bool {
        #[cfg(feature = "cuda")]
        return crate::cuda::KERNELS_COMPILED && crate::cuda::device_available();
        #[cfg(not(feature = "cuda"))]
        return false;
    }
}

/// g = m / max(‖W0 + s·B·A‖, ε) per output row, f32 (the CPU path's
/// [`crate::cpu::magnitude_scale`]); `None` for plain LoRA.
///
/// # Errors
/// Inconsistent layer shapes.
pub fn magnitude_scale(layer: &Layer) -> Result<Option<Vec<f32>>> {
    crate::cpu::magnitude_scale(layer)
}

/// W' = diag(g)·(W0 + s·B·A) as `[d_out, d_in]` row-major f32 (g = 1 for plain LoRA) from
/// [`crate::cpu::merged_weight`] or, on `Cuda`, [`crate::kernels::merged_weight`] on GPU 0;
/// with the g that undoing the merge divides by (from the CPU path in both cases: the two
/// agree to f32 rounding, far below the rounding of W' to a half-precision base).
///
/// # Errors
/// Inconsistent layer shapes; on `Cuda`, no usable GPU or a failing kernel.
pub fn merged_weight(layer: &Layer, device: MergeDevice) -> Result<(Vec<f32>, Option<Vec<f32>>)> {
    let w = match device {
        MergeDevice::Cpu => crate::cpu::merged_weight(layer)?,
        #[cfg(feature = "cuda")]
        MergeDevice::Cuda => {
            let b = cuda_backend()?;
            crate::kernels::merged_weight(b, layer)?
        }
        #[cfg(not(feature = "cuda"))]
        MergeDevice::Cuda => {
            anyhow::bail!("merge on CUDA: dorafuse was built without its `cuda` feature")
        }
    };
    let g = magnitude_scale(layer)?;
    Ok((w, g))
}

/// W' = diag(g)·(W0 + s·B·A) as the bytes that replace W0 in the model file: W0's dtype
/// (round-to-nearest-even) and stored layout (`[d_out, d_in]`, or `[d_in, d_out]` for
/// `fan_in_fan_out`), little-endian, written into `out` (resized to `d_out · d_in · size`;
/// its allocation is reused from call to call). Returns the g that undoing the merge divides
/// by (`None` for plain LoRA).
///
/// On the CPU with a `[d_out, d_in]` weight this is one pass over W0 on all cores
/// ([`crate::cpu::rows::merged_weight_into`]; the returned g is the one each row was scaled
/// by); otherwise [`merged_weight`], rounded.
///
/// # Errors
/// As [`merged_weight`]; a non-finite element of W' (before rounding), named by row and
/// column.
pub fn merged_weight_bytes(
    layer: &Layer,
    device: MergeDevice,
    out: &mut Vec<u8>,
) -> Result<Option<Vec<f32>>> {
    let n = layer.weight.len() * layer.weight.dtype().size();
    if device == MergeDevice::Cpu && !layer.fan_in_fan_out {
        out.resize(n, 0);
        return crate::cpu::rows::merged_weight_into(layer, out);
    }
    let (d_in, d_out, _) = layer.dims()?;
    let (w, g) = merged_weight(layer, device)?;
    if let Some(i) = w.iter().position(|x| !x.is_finite()) {
        bail!(
            "the merged weight has a non-finite element at row {}, column {}",
            i / d_in,
            i % d_in
        );
    }
    let stored = if layer.fan_in_fan_out {
        transpose(&w, d_out, d_in)
    } else {
        w
    };
    let t = Tensor::from_f32(layer.weight.dtype(), layer.weight.shape().to_vec(), &stored)?;
    out.clear();
    out.extend_from_slice(t.as_bytes());
    Ok(g)
}

/// Undoes a merge into the bytes that replace W' in the model file: `W0 = W'/g − s·B·A`
/// from the merged weight in `layer.weight` (stored layout, any dtype; the magnitude is
/// ignored), in the weight's dtype and stored layout, written into `out` (resized; its
/// allocation is reused from call to call).
///
/// On a `[d_out, d_in]` weight this is one pass on all cores
/// ([`crate::cpu::rows::unmerged_weight_into`]); otherwise [`unmerge_weight`], rounded. Both
/// give the same bits.
///
/// # Errors
/// As [`unmerge_weight`].
pub fn unmerged_weight_bytes(layer: &Layer, g: Option<&[f32]>, out: &mut Vec<u8>) -> Result<()> {
    let (d_in, d_out, _) = layer.dims()?;
    if !layer.fan_in_fan_out {
        out.resize(layer.weight.len() * layer.weight.dtype().size(), 0);
        return crate::cpu::rows::unmerged_weight_into(layer, g, out);
    }
    let rows = transpose(&layer.weight.to_f32(), d_in, d_out);
    let w0 = unmerge_weight(&rows, layer, g)?;
    let stored = transpose(&w0, d_out, d_in);
    let t = Tensor::from_f32(layer.weight.dtype(), layer.weight.shape().to_vec(), &stored)?;
    out.clear();
    out.extend_from_slice(t.as_bytes());
    Ok(())
}

/// `[rows, cols]` → `[cols, rows]`.
pub(crate) fn transpose(v: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    let mut t = vec![0f32; v.len()];
    for i in 0..rows {
        for j in 0..cols {
            t[j * rows + i] = v[i * cols + j];
        }
    }
    t
}

#[cfg(feature = "cuda")]
/// One CUDA backend per process, created on first use (module loading is not free).
fn cuda_backend() -> Result<&'static crate::cuda::CudaBackend> {
    static B: std::sync::OnceLock<crate::cuda::CudaBackend> = std::sync::OnceLock::new();
    if let Some(b) = B.get() {
        return Ok(b);
    }
    let b = crate::cuda::CudaBackend::new(0)?;
    Ok(B.get_or_init(|| b))
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
