//! DoRA layers for [candle](https://github.com/huggingface/candle) (feature `candle`):
//! [`DoraLinear`] (one adapter, DoRA or plain LoRA) and [`MultiDoraLinear`] (per-token adapter
//! indices, the multi-adapter layer of docs/design.md §2b), both `candle_core::Module`s, and
//! [`AdapterSet`], which puts PEFT adapter directories onto base weights loaded with candle.
//!
//! The math is docs/design.md §1 (PEFT semantics), with `W0 [d_out, d_in]`, `A [r, d_in]`,
//! `B [d_out, r]`, `m [d_out]` and `x [..., d_in]` (leading dimensions flattened to T tokens):
//!
//! ```text
//! g = m / max(‖W0 + s·B·A‖_row, ε)      y = g ⊙ (x·W0ᵀ + s·(x·Aᵀ)·Bᵀ) + b
//! ```
//!
//! Where the work runs:
//! - CPU tensors run the CPU path ([`crate::cpu`], [`crate::cpu::multi`]) with g computed
//!   once when the layer is built ([`CpuRoute::CpuPath`]), or the CUDA kernels on the
//!   emulator ([`CpuRoute::EmulatedKernels`], [`crate::emu`]), so the kernel path is exercised
//!   through candle on machines without a GPU;
//! - CUDA tensors (feature `candle-cuda`) run the kernels on candle's own stream, reading
//!   candle's input buffer and writing the output tensor's buffer, with W0, bias, the
//!   adapters and g uploaded and computed once on the device when the layer is built; no
//!   copy of the activations and no host synchronisation. The emulated route and the CUDA
//!   route are the same generic launch code (the engine API, docs/engine.md, over
//!   dorafuse's `Backend`), with different backends and buffers. Without the feature, CUDA
//!   tensors are refused in one line naming the layer.
//!
//! Training: when x, A, B or m is tracked by candle's autograd (a `Var`, or computed from
//! one), [`DoraLinear`] runs as a `CustomOp3` over `(x, A, [B | m])` whose backward is
//! dorafuse's ([`crate::cpu::run`], or [`crate::kernels::run`] on the emulator): gradients for
//! x, A, B and m, the norm detached as PEFT does ([`GradMode::Detached`]) or exact
//! ([`DoraLinear::with_grad_mode`]). W0 and the bias are frozen. Training on CUDA tensors is
//! refused in one line (inference only there).
//!
//! Errors from dorafuse reach candle as `candle_core::Error::Msg` with the whole context on
//! one line (`layer …: x is [..], expected …`).

#[cfg(feature = "candle-cuda")]
mod cuda;
mod engine;
mod linear;
mod load;
mod multi;

pub use linear::DoraLinear;
pub use load::AdapterSet;
pub use multi::{Indexed, MultiDoraLinear};

use crate::dtype::DType;
use crate::tensor::{Tensor as HostTensor, TensorData};
use anyhow::{bail, Result};
use candle_core::{Device, Tensor};

pub use crate::layer::GradMode;

/// Where a layer sends CPU tensors.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CpuRoute {
    /// dorafuse's CPU path ([`crate::cpu`]): f32 arithmetic, g cached per adapter.
    #[default]
    CpuPath,
    /// The fused CUDA kernels run by the CPU emulator ([`crate::emu::EmuBackend`], seeded
    /// from `DORAFUSE_EMU_SEED`): the code path of a GPU, on the CPU; slow (tests, checks).
    EmulatedKernels,
}

impl std::str::FromStr for CpuRoute {
    type Err = anyhow::Error;

    /// `cpu` or `emu`.
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "cpu" => Ok(CpuRoute::CpuPath),
            "emu" => Ok(CpuRoute::EmulatedKernels),
            _ => bail!("unknown CPU route {s:?}: expected cpu or emu"),
        }
    }
}

/// dorafuse's dtype of a candle dtype (f32, f16, bf16; others refused, naming the tensor).
fn host_dtype(d: candle_core::DType, name: &str) -> Result<DType> {
    Ok(match d {
        candle_core::DType::F32 => DType::F32,
        candle_core::DType::F16 => DType::F16,
        candle_core::DType::BF16 => DType::BF16,
        d => bail!("{name} is {d:?}: dorafuse takes f32, f16 or bf16"),
    })
}

/// A candle tensor's values as a host tensor of the same shape and dtype (one copy; a CUDA
/// tensor is read back). Errors name the tensor.
pub(crate) fn to_host(t: &Tensor, name: &str) -> Result<HostTensor> {
    let shape = t.dims().to_vec();
    let flat = t.flatten_all()?;
    let data = match host_dtype(t.dtype(), name)? {
        DType::F32 => TensorData::F32(flat.to_vec1()?),
        DType::F16 => TensorData::F16(flat.to_vec1()?),
        DType::BF16 => TensorData::BF16(flat.to_vec1()?),
    };
    HostTensor::new(shape, data)
}

/// A host tensor as a candle tensor on `device` (one copy), same shape and dtype.
pub(crate) fn from_host(t: &HostTensor, device: &Device) -> candle_core::Result<Tensor> {
    match t.data() {
        TensorData::F32(v) => Tensor::from_slice(v, t.shape(), device),
        TensorData::F16(v) => Tensor::from_slice(v, t.shape(), device),
        TensorData::BF16(v) => Tensor::from_slice(v, t.shape(), device),
    }
}

/// An error of dorafuse as candle's error, its context chain on one line.
pub(crate) fn to_candle(e: anyhow::Error) -> candle_core::Error {
    candle_core::Error::Msg(format!("{e:#}"))
}

/// `xs [..., d_in]` as `[T, d_in]` and the leading dimensions, or a one-line error naming
/// the layer.
pub(crate) fn flatten_tokens(
    xs: &Tensor,
    d_in: usize,
    layer: &str,
) -> candle_core::Result<(Tensor, Vec<usize>)> {
    let dims = xs.dims();
    if dims.is_empty() || dims[dims.len() - 1] != d_in {
        return Err(candle_core::Error::Msg(format!(
            "layer {layer}: x is {dims:?}, expected [..., {d_in}] (d_in of the weight)"
        )));
    }
    let lead = dims[..dims.len() - 1].to_vec();
    let t: usize = lead.iter().product();
    if t == 0 {
        return Err(candle_core::Error::Msg(format!(
            "layer {layer}: x is {dims:?}: at least one token is needed"
        )));
    }
    Ok((xs.reshape((t, d_in))?, lead))
}

/// The emulator backend a layer routed to [`CpuRoute::EmulatedKernels`] launches on.
pub(crate) fn emulator() -> Result<crate::emu::EmuBackend> {
    crate::emu::EmuBackend::from_env()
}

/// A value built at its first use and kept (a layer's device state for the emulated route,
/// built only when that route is taken). Clones share it.
#[derive(Debug)]
pub(crate) struct Lazy<T>(std::sync::Arc<std::sync::OnceLock<T>>);

impl<T> Clone for Lazy<T> {
    fn clone(&self) -> Self {
        Lazy(self.0.clone())
    }
}

impl<T> Default for Lazy<T> {
    fn default() -> Self {
        Lazy(Default::default())
    }
}

impl<T> Lazy<T> {
    /// The value, built by `init` at the first call (a failed build is retried next time).
    pub(crate) fn get_or_try(&self, init: impl FnOnce() -> Result<T>) -> Result<&T> {
        if let Some(v) = self.0.get() {
            return Ok(v);
        }
        let v = init()?;
        // A racing call may have set it first; either value is the same layer's.
        let _ = self.0.set(v);
        Ok(self.0.get().expect("set just above"))
    }
}

/// Runs an `EngineLayer`/`EnginePool` forward on a host tensor, typed by the layer dtype.
macro_rules! on_host_by_dtype {
    ($b:expr, $dtype:expr, $x:expr, $d_out:expr, |$xv:ident, $yv:ident| $body:expr) => {
        match $dtype {
            $crate::dtype::DType::F32 => {
                super::engine::on_host::<_, f32>($b, $x, $d_out, |$xv, $yv| $body)
            }
            $crate::dtype::DType::F16 => {
                super::engine::on_host::<_, half::f16>($b, $x, $d_out, |$xv, $yv| $body)
            }
            $crate::dtype::DType::BF16 => {
                super::engine::on_host::<_, half::bf16>($b, $x, $d_out, |$xv, $yv| $body)
            }
        }
    };
}
pub(crate) use on_host_by_dtype;
