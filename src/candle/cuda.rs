//! CUDA tensors (feature `candle-cuda`): dorafuse's kernels on candle's own stream, reading
//! candle's input buffer and writing an output buffer allocated on that stream, which becomes
//! the result tensor's storage. No copy of the activations, no host synchronisation; W0, the
//! bias and the adapters are uploaded once when the layer is built and g is computed then,
//! on the same stream, by the norm kernel.
//!
//! The launch code is [`super::engine`]'s, the same generic code the emulated route runs in
//! `cargo test`; this file only supplies the backend (a [`CudaBackend`] made from candle's
//! `CudaStream`) and the buffers (candle's `CudaSlice`s, through cudarc's events).

use super::engine::{EngineLayer, EnginePool};
use super::to_candle;
use crate::backend::{Backend, Elem};
use crate::cuda::CudaBackend;
use crate::kernels::{DevView, DevViewMut, MatShape};
use anyhow::{bail, Context, Result};
use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::CudaDType;
use candle_core::{CpuStorage, CudaDevice, CudaStorage, CustomOp1, Layout, Shape, Tensor};
use cudarc::driver::{DeviceRepr, ValidAsZeroBits};
use std::sync::Arc;

/// A backend on `dev`'s stream (candle's own: every launch is ordered with candle's ops).
///
/// # Errors
/// Kernels not compiled into this build (no nvcc at build time), or a driver error loading
/// the kernel module.
pub(crate) fn backend(dev: &CudaDevice) -> Result<Arc<CudaBackend>> {
    Ok(Arc::new(
        CudaBackend::from_stream(dev.cuda_stream()).context("dorafuse on candle's CUDA stream")?,
    ))
}

/// Runs `run` on a view of candle's x (contiguous, `[t, d_in]` from the layout's offset) and a
/// view of a new `[t, d_out]` buffer allocated on candle's stream, which is returned as the
/// result's storage.
fn launch<T>(
    b: &CudaBackend,
    s: &CudaStorage,
    l: &Layout,
    (d_in, d_out): (usize, usize),
    run: impl FnOnce(&DevView<T>, &mut DevViewMut<T>) -> Result<()>,
) -> Result<(CudaStorage, Shape)>
where
    T: Elem + CudaDType + DeviceRepr + ValidAsZeroBits,
{
    let (lo, hi) = l
        .contiguous_offsets()
        .context("x is not contiguous (the layer makes it so: a bug)")?;
    let t = (hi - lo) / d_in;
    let xs = s.as_cuda_slice::<T>()?;
    // Zeroed (a memset on the stream): the base GEMM writes every element before it is read.
    let mut y = s.device.alloc_zeros::<T>(t * d_out)?;
    {
        let xv = b.view_of(xs.slice(lo..hi), MatShape::new(t, d_in));
        let mut yv = b.view_mut(&mut y, MatShape::new(t, d_out));
        run(&xv, &mut yv)?;
    }
    Ok((
        CudaStorage::wrap_cuda_slice(y, s.device.clone()),
        Shape::from((t, d_out)),
    ))
}

/// Dispatches [`launch`] on x's dtype (f32, f16, bf16; the layer checks it is its own).
macro_rules! by_dtype {
    ($b:expr, $s:expr, $l:expr, $dims:expr, |$x:ident, $y:ident| $body:expr) => {
        match $s.dtype() {
            candle_core::DType::F32 => launch::<f32>($b, $s, $l, $dims, |$x, $y| $body),
            candle_core::DType::F16 => launch::<half::f16>($b, $s, $l, $dims, |$x, $y| $body),
            candle_core::DType::BF16 => launch::<half::bf16>($b, $s, $l, $dims, |$x, $y| $body),
            d => bail!("x is {d:?}: dorafuse takes f32, f16 or bf16"),
        }
    };
}

/// The single-adapter forward as a candle op without backward (inference).
struct LinearForward<'a> {
    engine: &'a EngineLayer<CudaBackend>,
    dims: (usize, usize),
    name: &'a str,
}

impl CustomOp1 for LinearForward<'_> {
    fn name(&self) -> &'static str {
        "dorafuse-dora-linear-cuda"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        Err(candle_core::Error::Msg(format!(
            "layer {}: the CUDA route was given a CPU tensor",
            self.name
        )))
    }

    fn cuda_fwd(&self, s: &CudaStorage, l: &Layout) -> candle_core::Result<(CudaStorage, Shape)> {
        let e = self.engine;
        let run = || by_dtype!(e.backend(), s, l, self.dims, |x, y| e.forward(x, y));
        run()
            .with_context(|| format!("layer {}", self.name))
            .map_err(to_candle)
    }
}

/// `y = g ⊙ (x·W0ᵀ + s·(x·Aᵀ)·Bᵀ) + b` for a CUDA x `[t, d_in]` on `engine`'s device.
pub(crate) fn forward_linear(
    engine: &EngineLayer<CudaBackend>,
    x: &Tensor,
    dims: (usize, usize),
    name: &str,
) -> candle_core::Result<Tensor> {
    x.contiguous()?
        .apply_op1_no_bwd(&LinearForward { engine, dims, name })
}

/// The multi-adapter forward as a candle op without backward (inference).
struct PoolForward<'a> {
    pool: &'a EnginePool<CudaBackend>,
    index: &'a [i32],
    dims: (usize, usize),
    name: &'a str,
}

impl CustomOp1 for PoolForward<'_> {
    fn name(&self) -> &'static str {
        "dorafuse-multi-dora-linear-cuda"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        Err(candle_core::Error::Msg(format!(
            "layer {}: the CUDA route was given a CPU tensor",
            self.name
        )))
    }

    fn cuda_fwd(&self, s: &CudaStorage, l: &Layout) -> candle_core::Result<(CudaStorage, Shape)> {
        let (p, index) = (self.pool, self.index);
        let run = || by_dtype!(p.backend(), s, l, self.dims, |x, y| p.forward(x, index, y));
        run()
            .with_context(|| format!("layer {}", self.name))
            .map_err(to_candle)
    }
}

/// The pool's forward for a CUDA x `[t, d_in]` with one checked slot index per token.
pub(crate) fn forward_pool(
    pool: &EnginePool<CudaBackend>,
    x: &Tensor,
    index: &[i32],
    dims: (usize, usize),
    name: &str,
) -> candle_core::Result<Tensor> {
    x.contiguous()?.apply_op1_no_bwd(&PoolForward {
        pool,
        index,
        dims,
        name,
    })
}
