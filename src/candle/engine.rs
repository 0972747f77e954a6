//! The kernel route of the candle layers, written once over dorafuse's [`Backend`]: the
//! engine API's objects ([`kernels::DoraLinear`], [`kernels::DoraAdapter`],
//! [`kernels::AdapterPool`]) built from a layer's host tensors, and their forwards over
//! views. [`CpuRoute::EmulatedKernels`](super::CpuRoute) runs this code on the emulator with
//! buffers it uploads; CUDA tensors run the same code on candle's stream with candle's own
//! buffers (feature `candle-cuda`, src/candle/cuda.rs): the two routes differ only in the
//! backend and where the buffers come from.

use crate::backend::{Backend, DeviceBuffer, Elem};
use crate::case_multi::MultiLayer;
use crate::dtype::DType;
use crate::kernels::{
    upload_as, AdapterPool, BaseResult, DevView, DevViewMut, DoraAdapter, DoraLinear, MatShape,
    SlotIndex,
};
use crate::layer::Layer;
use crate::tensor::{Tensor as HostTensor, TensorData};
use anyhow::{Context, Result};
use std::sync::{Arc, Mutex};

/// f32 zeros of `shape` on the host.
fn zeros(shape: Vec<usize>) -> Result<HostTensor> {
    let n = shape.iter().product();
    HostTensor::new(shape, TensorData::F32(vec![0.0; n]))
}

/// One adapter's factors on `b` in `T` (the layer dtype or f32), its magnitude in f32.
fn upload_adapter_as<B: Backend, T: Elem>(
    b: &B,
    lora_a: &HostTensor,
    lora_b: &HostTensor,
    magnitude: Option<&HostTensor>,
    scaling: f64,
) -> Result<DoraAdapter<B>> {
    let (r, d_in) = (lora_a.shape()[0], lora_a.shape()[1]);
    let d_out = lora_b.shape()[0];
    let m = magnitude
        .map(|m| upload_as::<B, f32>(b, m, "magnitude"))
        .transpose()?;
    DoraAdapter::new::<T>(
        b,
        upload_as::<B, T>(b, lora_a, "lora_A")?,
        upload_as::<B, T>(b, lora_b, "lora_B")?,
        m,
        scaling as f32,
        r,
        d_in,
        d_out,
    )
}

/// One adapter uploaded in `dtype` (f32, or the layer dtype).
fn upload_adapter<B: Backend>(
    b: &B,
    dtype: DType,
    lora_a: &HostTensor,
    lora_b: &HostTensor,
    magnitude: Option<&HostTensor>,
    scaling: f64,
) -> Result<DoraAdapter<B>> {
    match dtype {
        DType::F32 => upload_adapter_as::<B, f32>(b, lora_a, lora_b, magnitude, scaling),
        DType::F16 => upload_adapter_as::<B, half::f16>(b, lora_a, lora_b, magnitude, scaling),
        DType::BF16 => upload_adapter_as::<B, half::bf16>(b, lora_a, lora_b, magnitude, scaling),
    }
}

/// The adapter dtype the kernels take beside a `layer` weight: the factors' own when it is
/// the layer dtype or f32, f32 otherwise (exact: f16 and bf16 widen to f32 without rounding).
fn adapter_dtype(layer: DType, factors: DType) -> DType {
    if factors == layer {
        layer
    } else {
        DType::F32
    }
}

/// One layer with one adapter on a backend: W0, bias, A, B and m uploaded once, g computed
/// once by the norm kernel on the backend's stream ([`DoraAdapter::compute_scale`]).
pub(crate) struct EngineLayer<B: Backend> {
    backend: Arc<B>,
    /// The layer and its owned workspace (grown at a new largest token count).
    linear: Mutex<DoraLinear<B>>,
    adapter: DoraAdapter<B>,
    dtype: DType,
}

impl<B: Backend> std::fmt::Debug for EngineLayer<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "EngineLayer({} on {})",
            self.dtype,
            std::any::type_name::<B>()
        )
    }
}

impl<B: Backend> EngineLayer<B> {
    /// Uploads `layer` (W0 in its dtype, the bias in f32, the adapter in the layer dtype or
    /// f32) on `backend`'s stream and computes g there.
    ///
    /// # Errors
    /// Shapes that disagree (naming the tensor), a rank above the kernels' limit, or a device
    /// error.
    pub(crate) fn upload(backend: Arc<B>, layer: &Layer) -> Result<Self> {
        let dtype = layer.weight.dtype();
        let linear = DoraLinear::upload(backend.clone(), layer)?;
        let mut adapter = upload_adapter(
            &*backend,
            adapter_dtype(dtype, layer.lora_a.dtype()),
            &layer.lora_a,
            &layer.lora_b,
            layer.magnitude.as_ref(),
            layer.scaling,
        )?;
        adapter.compute_scale(&linear)?;
        Ok(Self {
            backend,
            linear: Mutex::new(linear),
            adapter,
            dtype,
        })
    }

    /// The layer dtype (x and y must have it).
    pub(crate) fn dtype(&self) -> DType {
        self.dtype
    }

    /// The backend (stream) every call is ordered on.
    pub(crate) fn backend(&self) -> &B {
        &self.backend
    }

    /// `y = g ⊙ (x·W0ᵀ + s·(x·Aᵀ)·Bᵀ) + b` for x `[t, d_in]` contiguous, y `[t, d_out]`:
    /// cuBLAS (or the emulator's GEMM) for the base, then the shrink and compose kernels,
    /// all on the backend's stream; nothing synchronises the host.
    pub(crate) fn forward<T: Elem>(&self, x: &DevView<T>, y: &mut DevViewMut<T>) -> Result<()> {
        self.linear
            .lock()
            .expect("the layer is never poisoned: no panics while held")
            .forward(&self.adapter, x, BaseResult::Compute, y)
    }
}

/// One base layer with an adapter pool on a backend (docs/engine.md, "the adapter pool"):
/// slot k is the model's adapter k, a slot whose adapter leaves this module alone serves its
/// tokens as base-only. Adapters are held in f32 (PEFT's dtype; exact beside any layer).
pub(crate) struct EnginePool<B: Backend> {
    backend: Arc<B>,
    linear: DoraLinear<B>,
    pool: AdapterPool<B>,
    dtype: DType,
}

impl<B: Backend> std::fmt::Debug for EnginePool<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "EnginePool({} slots, {} on {})",
            self.pool.slots(),
            self.dtype,
            std::any::type_name::<B>()
        )
    }
}

impl<B: Backend> EnginePool<B> {
    /// Uploads the base of `layer` and each adapter into the slot `slot_of[k]` (the model's
    /// slot of `layer.adapters[k]`) of a pool of `slots` slots; every other slot is marked
    /// base-only. g is computed on the backend's stream.
    ///
    /// # Errors
    /// Shapes that disagree, a rank above the kernels' limit, or a device error; each names
    /// the slot.
    pub(crate) fn upload(
        backend: Arc<B>,
        layer: &MultiLayer,
        slots: usize,
        slot_of: &[usize],
    ) -> Result<Self> {
        let (d_in, d_out) = layer.dims()?;
        let base = Layer {
            weight: layer.weight.clone(),
            bias: layer.bias.clone(),
            // A rank-1 stand-in: the pool holds the adapters, the layer only W0 and bias.
            lora_a: zeros(vec![1, d_in])?,
            lora_b: zeros(vec![d_out, 1])?,
            magnitude: None,
            scaling: 1.0,
            fan_in_fan_out: layer.fan_in_fan_out,
        };
        let linear = DoraLinear::upload(backend.clone(), &base)?;
        let r_max = layer
            .adapters
            .iter()
            .map(|a| a.lora_a.shape()[0])
            .max()
            .unwrap_or(1);
        // A model without adapters still gets a (base-only) slot: the pool needs one.
        let slots = slots.max(1);
        let mut pool = AdapterPool::new(&linear, slots, r_max, DType::F32)?;
        let mut filled = vec![false; slots];
        for (a, &k) in layer.adapters.iter().zip(slot_of) {
            let adapter = upload_adapter(
                &*backend,
                DType::F32,
                &a.lora_a,
                &a.lora_b,
                a.magnitude.as_ref(),
                a.scaling,
            )
            .with_context(|| format!("adapter slot {k}"))?;
            pool.load(&linear, &backend, k, adapter)
                .with_context(|| format!("adapter slot {k}"))?;
            filled[k] = true;
        }
        for (k, _) in filled.iter().enumerate().filter(|(_, f)| !**f) {
            pool.set_base_only(&backend, k)?;
        }
        Ok(Self {
            dtype: layer.weight.dtype(),
            backend,
            linear,
            pool,
        })
    }

    /// The layer dtype (x and y must have it).
    pub(crate) fn dtype(&self) -> DType {
        self.dtype
    }

    /// The backend (stream) every call is ordered on.
    pub(crate) fn backend(&self) -> &B {
        &self.backend
    }

    /// `y_t = g_k ⊙ (x_t·W0ᵀ + s_k·(x_t·A_kᵀ)·Bᵀ_k) + b` with k = `index[t]` (−1: base only),
    /// for x `[t, d_in]` contiguous and y `[t, d_out]`: the base GEMM and the pool's two
    /// launches on the backend's stream. The index (checked by the caller against the slots)
    /// is uploaded on that stream, and the workspace allocated there.
    pub(crate) fn forward<T: Elem>(
        &self,
        x: &DevView<T>,
        index: &[i32],
        y: &mut DevViewMut<T>,
    ) -> Result<()> {
        let b = &*self.backend;
        let t = index.len();
        let mut ibuf = b.alloc_zeroed(4 * t)?;
        b.upload(&mut ibuf, bytemuck::cast_slice(index))
            .context("uploading adapter_index")?;
        debug_assert!(ibuf.bytes() >= 4 * t);
        let idx = SlotIndex::from_buffer(b, &ibuf, t)?;
        let need = self.pool.workspace_len(t);
        let mut ws = b.alloc_slice::<f32>(need)?;
        let mut wv = b.view_mut(&mut ws, MatShape::new(1, need));
        self.pool
            .forward(&self.linear, x, &idx, BaseResult::Compute, y, &mut wv)
    }
}

/// The kernel route on a host tensor `x [t, d_in]`: x uploaded as `T` (the layer dtype),
/// `run` on views of the backend's buffers, y `[t, d_out]` read back in x's dtype. The
/// emulator's route; on CUDA the views are of candle's buffers instead.
pub(crate) fn on_host<B: Backend, T: Elem>(
    b: &B,
    x: &HostTensor,
    d_out: usize,
    run: impl FnOnce(&DevView<T>, &mut DevViewMut<T>) -> Result<()>,
) -> Result<HostTensor> {
    let (t, d_in) = (x.shape()[0], x.shape()[1]);
    let xt = x.cast(T::DTYPE);
    let xs = b.upload_slice::<T>(bytemuck::cast_slice(xt.as_bytes()))?;
    let mut ys = b.alloc_slice::<T>(t * d_out)?;
    {
        let xv = b.view(&xs, MatShape::new(t, d_in));
        let mut yv = b.view_mut(&mut ys, MatShape::new(t, d_out));
        run(&xv, &mut yv)?;
    }
    let v = b.download_slice(&ys)?;
    Ok(HostTensor::from_bytes(T::DTYPE, vec![t, d_out], bytemuck::cast_slice(&v))?.cast(x.dtype()))
}
