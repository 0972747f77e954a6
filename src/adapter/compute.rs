//! The one place where the adapter code asks for arithmetic on a layer: the DoRA scale g
//! and the merged weight W' = diag(g)·(W0 + s·B·A), on the CPU path or on a GPU.

use crate::layer::Layer;
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
